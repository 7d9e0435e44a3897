"""The hardened objective against the paper's on digits (docs/hardening.md, results/harden-digits.json).

Run (each `run` inside the compute lock on a shared machine; a few minutes each):
    python benchmarks/harden_digits.py run --target rot90 --variant paper --out runs/harden
    python benchmarks/harden_digits.py run --target rot90 --variant operators --out runs/harden
    python benchmarks/harden_digits.py run --target rot90 --variant lookahead --out runs/harden
    ... the same for --target rot180 ...
    python benchmarks/harden_digits.py collect --out runs/harden --json results/harden-digits.json

Every variant trains the protected LoRA update of the target with configs/digits-demo.yaml's recipe (the
same 600 optimizer steps, lr, schedule, clipping and seed; only ``train.objective`` differs, see
VARIANTS), timed alone on one thread; then ``trap2 demo``'s pipeline attacks it (the other 7 tasks'
shipped plain updates as the pool) with TA, TIES, TSV and CART in full space (global coefficient
search), and the per_task, prodistill and untrap searches. ``collect`` gathers the runs' reports into
one result JSON with its provenance (``trap2 report`` renders it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trap2.config import ObjectiveConfig, TrainConfig, from_dict, load_yaml, to_dict
from trap2.eval.report import provenance
from trap2.io import write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "digits-demo.yaml"
METHODS = ("ta", "ties", "tsv", "cart")
SEARCHES = ("per_task", "prodistill", "untrap")
# objective fields over the recipe's (the paper's: lam 0.1, s ∈ [0.05, 2], δ 0.05, w = 1/s)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "operators": {"operators": "scale,layer_scale,trim,spectral"},
    "lookahead": {"lookahead_steps": 1, "lookahead_lr": 0.01, "lookahead_objective": "recover"},
    "lookahead_lr1e-3": {"lookahead_steps": 1, "lookahead_lr": 0.001, "lookahead_objective": "recover"},
    "scale_spectral": {"operators": "scale,spectral"},
    "both": {
        "operators": "scale,layer_scale,trim,spectral",
        "lookahead_steps": 1,
        "lookahead_lr": 0.01,
        "lookahead_objective": "recover",
    },
}


def train_config(variant: str) -> TrainConfig:
    base = from_dict(TrainConfig, load_yaml(RECIPE)["train"])
    objective = dataclasses.replace(base.objective, **VARIANTS[variant])
    return dataclasses.replace(base, objective=ObjectiveConfig(**to_dict(objective)))


def run(target: str, variant: str, out: Path) -> None:
    from trap2.demo import run_demo
    from trap2.pipeline import DemoConfig, trained_update, update_cache_folder
    from trap2.suites import get_suite

    cfg = DemoConfig(
        suite="digits",
        target=target,
        train=train_config(variant),
        methods=METHODS,
        spaces=("full",),
        extra_searches=SEARCHES,
    )
    folder = out / target
    cache = folder / "updates"
    suite = get_suite("digits")
    train_seconds = None
    if not update_cache_folder(suite, target, cfg.train, cache).is_dir():  # time the training alone
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        trained_update(suite, target, cfg.train, cache)
        train_seconds = time.perf_counter() - t0
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    report = run_demo(cfg, folder, workers=2)
    record = {
        "target": target,
        "variant": variant,
        "objective": to_dict(cfg.train.objective),
        "train_seconds": train_seconds,
        "demo_seconds": time.perf_counter() - t0,
        "report": {k: report[k] for k in ("zero_shot", "standalone", "scaling_curve", "attacks", "tasks")},
    }
    write_json(folder / f"{variant}.json", record)
    print(f"{target} {variant}: train {train_seconds} s, demo {record['demo_seconds']:.0f} s")


def collect(out: Path, dest: Path) -> None:
    runs = []
    for path in sorted(out.glob("*/*.json")):
        r = json.loads(path.read_text())
        if "variant" in r:
            runs.append(r)
    if not runs:
        raise SystemExit(f"no runs under {out}")
    order = {v: i for i, v in enumerate(VARIANTS)}
    runs.sort(key=lambda r: (r["target"], order.get(r["variant"], 99)))
    wall = sum((r["train_seconds"] or 0) + r["demo_seconds"] for r in runs)
    result = {
        **provenance("harden", wall_seconds=round(wall, 1)),
        "command": shlex.join(["python", "benchmarks/harden_digits.py", *sys.argv[1:]]),
        "threads": 2,
        "machine": provenance("harden")["machine"] + " (shared; each run inside the compute lock)",
        "note": "wall_seconds sums the runs' training and attack times; each run: "
        "python benchmarks/harden_digits.py run --target T --variant V --out " + str(out) + " (the protected "
        "training timed alone on 1 thread, then the attacks on 2 worker processes of 1 thread)",
        "suite": "digits",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "methods": list(METHODS),
        "searches": list(SEARCHES),
        "variants": {v: VARIANTS[v] for v in dict.fromkeys(r["variant"] for r in runs)},
        "runs": [_summary(r) for r in runs],
    }
    write_json(dest, result)
    print(f"wrote {dest}")


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    """One run: standalone, the curve, and each attack cell's target and mean accuracy, both pools."""
    rep, target = r["report"], r["target"]
    cells = [
        {
            "method": a["method"],
            "space": a["space"],
            "search": a["search"],
            "protected": a["protected"],
            "coefficient": a.get("coefficient"),
            "target_acc": a["acc"][target],
            "mean_acc": a["acc"]["mean"],
        }
        for a in rep["attacks"]
    ]
    return {
        "target": target,
        "variant": r["variant"],
        "objective": r["objective"],
        "train_seconds": r["train_seconds"],
        "demo_seconds": r["demo_seconds"],
        "zero_shot": {target: rep["zero_shot"][target], "mean": rep["zero_shot"]["mean"]},
        "standalone": {
            "unprotected": rep["standalone"]["unprotected"][target],
            "protected": rep["standalone"]["protected"][target],
        },
        "scaling_curve": rep["scaling_curve"],
        "attacks": cells,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--target", required=True)
    r.add_argument("--variant", required=True, choices=list(VARIANTS))
    r.add_argument("--out", type=Path, default=Path("runs/harden"))
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, default=Path("runs/harden"))
    c.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.target, args.variant, args.out)
    else:
        collect(args.out, args.json)


if __name__ == "__main__":
    main()
