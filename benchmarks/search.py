"""Coefficient-search overhead and merge cost vs mergekit, measured side by side in one run.

Run:  python benchmarks/search.py [--layers 16] [--dim 768] [--threads 1]
      python benchmarks/search.py --only-methods --methods wudi,iso_c,iso_cts,emr --threads 2 --out bench.json

1. The paper's 99-point global search on the digits suite (8 updates, TIES in full space) against 99 ×
   one evaluation: the merged delta is computed once, so the ratio should stay near 1 (goal ≤ 1.2).
2. The same 8-update TIES merge by trap2 (inputs streamed tensor by tensor from safetensors) and by
   mergekit's in-process ``merge_state_dicts`` (base and every fine-tuned checkpoint in memory), each in
   its own process: wall time and peak RSS, printed as ratios.
3. With ``--methods``: each listed trap2 merge method (default hyperparameters, full space) on the same
   8 dense updates of section 2, each in its own process: wall time and peak RSS. ``--only-methods``
   skips sections 1 and 2; ``--out`` writes what was measured as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

T = 8


def search_overhead(repeats: int) -> tuple[float, float, float]:
    from trap2.attacks import EvalContext, search_coefficient
    from trap2.merging import merge_updates
    from trap2.suites import get_suite
    from trap2.updates import Update

    suite = get_suite("digits")
    ctx = EvalContext(suite, {t: 1.0 for t in suite.task_names})
    g = torch.Generator().manual_seed(0)
    pool = [
        Update({n: 0.01 * torch.randn(p.shape, generator=g) for n, p in ctx.w0.items()}) for _ in range(T)
    ]
    merged = merge_updates(pool, "ties").dense()
    for _ in range(3):  # warm-up
        ctx.val_score(ctx.params(merged, 0.5))
    one = []
    for _ in range(repeats * 10):
        t0 = time.perf_counter()
        ctx.val_score(ctx.params(merged, 0.5))
        one.append(time.perf_counter() - t0)
    full = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merged = merge_updates(pool, "ties").dense()
        search_coefficient(lambda c, m=merged: ctx.val_score(ctx.params(m, c)), patience=None)
        full.append(time.perf_counter() - t0)
    t_one, t_search = statistics.median(one), statistics.median(full)
    return t_one, t_search, t_search / (99 * t_one)


def _job(kind: str, folder: Path) -> None:
    """Child process: run one merge, print its wall time."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    paths = sorted(folder.glob("u*.safetensors"))
    if kind == "baseline":  # imports and the base only: what both jobs pay anyway
        from safetensors.torch import load_file

        import trap2.merging  # noqa: F401

        load_file(folder / "base.safetensors")
        print(0.0)
        return
    t0 = time.perf_counter()
    if kind == "trap2" or kind.startswith("trap2:"):
        from safetensors.torch import load_file

        from trap2.merging import merge_updates
        from trap2.updates import load_update

        base = load_file(folder / "base.safetensors")
        method, hp = (kind.split(":", 1)[1], {}) if ":" in kind else ("ties", {"k": 20.0})
        merged = merge_updates([load_update(p, lazy=True) for p in paths], method, **hp)
        dense = merged.dense()
        # a per-task method (EMR) gives one model per task: every one is built
        for d in dense if isinstance(dense, list) else [dense]:
            out = {n: base[n] + t for n, t in d.items()}
    else:
        from mergekit.merge_methods import merge_state_dicts
        from safetensors.torch import load_file

        base = load_file(folder / "base.safetensors")
        models = {"base": base}
        for i, p in enumerate(paths):
            d = load_file(p)
            models[f"m{i}"] = {n: base[n] + d[n] for n in base}
            del d
        params = {
            "weight": {f"m{i}": 1.0 for i in range(len(paths))},
            "density": {f"m{i}": 0.2 for i in range(len(paths))},
        }
        out = merge_state_dicts(models, "ties", parameters=params, base="base")
    assert len(out) == len(base)
    print(time.perf_counter() - t0)


def _run_child(kind: str, folder: Path, threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one job in a fresh process; the child reports its own peak
    (RUSAGE_SELF), so jobs can run in any order (RUSAGE_CHILDREN is the max over every child so far)."""
    env = {**os.environ, "BENCH_THREADS": str(threads)}
    code = (
        f"import sys, resource; sys.path.insert(0, {str(Path(__file__).parent)!r}); import search; "
        f"search._job({kind!r}, __import__('pathlib').Path({str(folder)!r})); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    wall, peak_kib = r.stdout.strip().splitlines()[-2:]
    return float(wall), float(peak_kib) / 1024


def merge_vs_mergekit(
    layers: int, dim: int, threads: int, kinds: tuple[str, ...] = ("baseline", "trap2", "mergekit")
) -> dict[str, tuple[float, float]]:
    """Each kind's (wall seconds, peak RSS MiB) on 8 dense updates of ``layers``·4 (dim, dim) matrices:
    'baseline' (imports and the base only), 'trap2' (TIES), 'trap2:METHOD', 'mergekit' (TIES)."""
    from trap2.io import save_tensors

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        g = torch.Generator().manual_seed(0)
        shapes = {f"layers.{i}.{n}.weight": (dim, dim) for i in range(layers) for n in ("q", "k", "v", "o")}
        save_tensors(folder / "base.safetensors", {n: torch.randn(s, generator=g) for n, s in shapes.items()})
        for t in range(T):
            save_tensors(
                folder / f"u{t}.safetensors",
                {n: 0.01 * torch.randn(s, generator=g) for n, s in shapes.items()},
            )
        return {kind: _run_child(kind, folder, threads) for kind in kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated trap2 merge methods to time (section 3)")
    ap.add_argument("--only-methods", action="store_true", help="run section 3 only")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    record: dict = {
        "kind": "benchmark: benchmarks/search.py",
        "command": "python " + " ".join(sys.argv),
        "threads": args.threads,
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
    }
    if not args.only_methods:
        record.update(search_and_mergekit(args))
    if args.methods:
        record["methods"] = method_times(args)
    record["wall_seconds"] = time.perf_counter() - t_start
    if args.out:
        from trap2 import __version__
        from trap2.io import write_json

        record["version"] = __version__
        write_json(args.out, record)


def method_times(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    methods = [m for m in args.methods.split(",") if m]
    n = args.layers * 4 * args.dim * args.dim
    res = merge_vs_mergekit(
        args.layers, args.dim, args.threads, ("baseline", *(f"trap2:{m}" for m in methods))
    )
    base_mib = res["baseline"][1]
    print(
        f"3. merge of {T} dense updates, {n / 1e6:.1f} M parameters each, default hyperparameters, full space"
    )
    out = {}
    for m in methods:
        t, peak = res[f"trap2:{m}"]
        print(
            f"   {m:9} wall {t:8.2f} s   peak RSS {peak:7.0f} MiB   (above imports + base: {peak - base_mib:6.0f} MiB)"
        )
        out[m] = {"wall_s": t, "peak_rss_mib": peak, "peak_above_base_mib": peak - base_mib, "parameters": n}
    return out


def search_and_mergekit(args: argparse.Namespace) -> dict:
    t_one, t_search, ratio = search_overhead(args.repeats)
    print("1. coefficient search, digits suite, 8 updates, TIES (median of repeats)")
    print(f"   one evaluation (8 tasks, validation)   {1000 * t_one:8.1f} ms")
    print(f"   merge once + 99-point search           {1000 * t_search:8.1f} ms")
    print(f"   ratio to 99 × one evaluation           {ratio:8.3f}   (goal ≤ 1.2)")

    out: dict = {"search": {"one_eval_s": t_one, "merge_and_search_s": t_search, "ratio": ratio}}
    try:
        import mergekit  # noqa: F401
    except ImportError:
        print("2. mergekit is not installed (pip install 'trap2[mergekit]'): merge comparison skipped")
        return out
    n = args.layers * 4 * args.dim * args.dim
    res = merge_vs_mergekit(args.layers, args.dim, args.threads)
    base_mib = res["baseline"][1]
    print(
        f"2. TIES merge of {T} dense updates, {n / 1e6:.1f} M parameters each ({4 * n / 2**20:.0f} MiB in fp32)"
    )
    for kind in ("trap2", "mergekit"):
        t, peak = res[kind]
        print(
            f"   {kind:9} wall {t:7.2f} s   peak RSS {peak:7.0f} MiB   (above imports + base: {peak - base_mib:6.0f} MiB)"
        )
    (t2, p2), (tm, pm) = res["trap2"], res["mergekit"]
    print(
        f"   ratio trap2 / mergekit: time {t2 / tm:.2f}, peak memory above baseline {(p2 - base_mib) / max(pm - base_mib, 1):.2f}"
    )
    out["ties_vs_mergekit"] = {k: {"wall_s": t, "peak_rss_mib": p} for k, (t, p) in res.items()}
    return out


if __name__ == "__main__":
    main()
