"""mergekit's own CLI (`mergekit-yaml`) as a third-party attacker on the `lm` suite's adapters.

Run (after `trap2 bench --suite lm --modes lora --out runs/lm-bench --targets add,...`):
    python benchmarks/mergekit_cli.py --bench runs/lm-bench --targets add --out results/lm-mergekit.json

For each target, two pools of the bench's cached LoRA updates (trained with the suite's LoRA recipe): every
task's plain adapter, and the same with the target's Trap²-protected one. Each update is folded into W0 and
saved as a model folder (W0 + ΔW, float32); mergekit-yaml merges them against the shipped base folder with
task_arithmetic (weight c per model), ties and dare_ties (mergekit's defaults: weights normalised, density
0.2 / 0.5, then scaled by lambda = c), for each c of --grid, each call a separate `mergekit-yaml` process
(--random-seed 0). The merged folder's weights are scored on every task: the mean over tasks on
validation picks c (as trap2's own search does), and test accuracy at that c is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# mergekit method: (per-model parameters, the knob the grid sets)
METHODS = {
    "task_arithmetic": ({}, "weight"),
    "ties": ({"density": 0.2}, "lambda"),
    "dare_ties": ({"density": 0.5}, "lambda"),
}


def mergekit_yaml() -> str:
    cli = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if not Path(cli).exists():
        sys.exit("mergekit-yaml not found: pip install 'trap2[mergekit]'")
    return cli


def merge_config(method: str, base: Path, models: list[Path], c: float) -> dict:
    per_model, knob = METHODS[method]
    weight = c if knob == "weight" else 1.0
    config = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": weight, **per_model}} for m in models],
    }
    if knob == "lambda":
        config["parameters"] = {"lambda": c}
    return config


def run_mergekit(config: dict, work: Path, threads: int) -> dict[str, torch.Tensor]:
    """One `mergekit-yaml` call; the merged weights."""
    from safetensors.torch import load_file

    (work / "merge.yml").write_text(json.dumps(config))  # JSON is valid YAML
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [mergekit_yaml(), str(work / "merge.yml"), str(out), "--no-copy-tokenizer", "--random-seed", "0",
           "--quiet", "-j", str(threads)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{r.stderr[-2000:]}")
    merged: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    return merged


def main() -> None:
    from trap2.bench import BenchConfig
    from trap2.eval.evaluate import accuracy, base_state
    from trap2.eval.report import provenance
    from trap2.io import write_json
    from trap2.pipeline import update_cache_folder
    from trap2.suites import get_suite
    from trap2.suites.lm import ASSET_DIR, load_lm
    from trap2.updates import apply_delta, load_update

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path("runs/lm-bench"), help="the bench's output folder")
    ap.add_argument("--targets", default="add", help="comma-separated protected targets")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--grid", default="0.3,0.5,0.7,1.0", help="values of c (weight or lambda)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = get_suite("lm")
    train = BenchConfig(suite="lm").train_config(suite, "lora")
    cache = args.bench / "updates"

    def cached(task: str, cfg) -> Path:
        folder = update_cache_folder(suite, task, cfg, cache)
        if not folder.is_dir():
            sys.exit(f"{folder}: missing; run  trap2 bench --suite lm --modes lora --out {args.bench}  first")
        return folder

    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    lm = load_lm()
    full_w0 = {k: v.clone() for k, v in lm.state_dict().items()}  # norms, embeddings, head: W0's
    grid = [float(c) for c in args.grid.split(",")]
    cells = []
    with tempfile.TemporaryDirectory(prefix="trap2-mergekit-") as tmp:
        work = Path(tmp)
        folders: dict[str, Path] = {}

        def model_folder(name: str, update_path: Path) -> Path:
            """W0 + ΔW of the update as a model folder (written once)."""
            if name not in folders:
                delta = load_update(update_path).dense()
                lm.load_state_dict({**full_w0, **apply_delta(w0, delta)})
                lm.save_pretrained(work / name)
                folders[name] = work / name
            return folders[name]

        plain = {t: model_folder(f"plain-{t}", cached(t, train.plain())) for t in suite.task_names}
        for target in args.targets.split(","):
            protected = model_folder(f"trap2-{target}", cached(target, train))
            for method in args.methods.split(","):
                for is_protected in (False, True):
                    models = [
                        protected if (is_protected and t == target) else plain[t] for t in suite.task_names
                    ]
                    best = None
                    for c in grid:
                        merged = run_mergekit(merge_config(method, ASSET_DIR, models, c), work, args.threads)
                        params = {n: merged[n] for n in w0}
                        val = {t: accuracy(backbone, suite.task(t), "val", params) for t in suite.task_names}
                        mean = sum(val.values()) / len(val)
                        print(f"{target} {method} protected={is_protected} c={c}: val mean {100 * mean:.1f}")
                        if best is None or mean > best[0]:
                            best = (mean, c, params)
                    _, c, params = best
                    test = {t: accuracy(backbone, suite.task(t), "test", params) for t in suite.task_names}
                    test["mean"] = sum(test.values()) / len(suite.task_names)
                    cells.append({"target": target, "method": method, "protected": is_protected, "c": c,
                                  "knob": METHODS[method][1], "acc": test})  # fmt: skip
                    print(
                        f"  -> c={c} test: {target} {100 * test[target]:.1f}, mean {100 * test['mean']:.1f}"
                    )
    zero = {t: accuracy(backbone, suite.task(t), "test") for t in suite.task_names}
    result = {
        **provenance("mergekit-cli", time.perf_counter() - t0),
        "suite": "lm",
        "mergekit": _version("mergekit"),
        "tasks": suite.task_names,
        "grid": grid,
        "zero_shot": {**zero, "mean": sum(zero.values()) / len(zero)},
        "cells": cells,
    }
    if args.out:
        write_json(args.out, result)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
