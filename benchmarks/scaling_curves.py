"""Accuracy of updates at scales s (the scaling curve) on a suite's task, one JSON row per update.

Run:  python benchmarks/scaling_curves.py --suite text-transformer --task hyperbaton --out curves.json UPDATE...

Each UPDATE is a saved update (PEFT adapter folder or dense delta); acc(s) is the task's test accuracy of
W0 + s·ΔW (``trap2.eval.evaluate.scaling_curve``). Each row also carries the update's recorded protect
phase (agreement with the original, steps, settings) when it has one. ``--splits`` adds the accuracy at
s = 1 on the train, val and test splits (is a standalone gap under-fitting or a generalisation gap?).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from trap2.config import TrainConfig, from_dict  # noqa: E402
from trap2.eval.evaluate import scaling_curve  # noqa: E402
from trap2.eval.report import provenance  # noqa: E402
from trap2.io import write_json  # noqa: E402
from trap2.suites import get_suite  # noqa: E402
from trap2.updates import load_update  # noqa: E402

SCALES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)


def train_steps(meta: dict) -> int | None:
    """The optimizer steps the update was trained for (``TrainConfig.run_steps``), if it records them."""
    if not meta.get("train"):
        return None
    train = {**meta["train"], "objective": meta.get("objective") or {}}
    return from_dict(TrainConfig, train, "the update's train settings").run_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("updates", nargs="+")
    ap.add_argument("--suite", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--splits", action="store_true", help="also acc at s = 1 on train, val and test")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = get_suite(args.suite)
    task = suite.task(args.task)
    # scaling_curve evaluates W0 + s·ΔW functionally: one backbone serves all
    backbone = suite.make_backbone()
    rows = []
    for path in args.updates:
        update = load_update(path)
        delta = update.dense()
        curve = scaling_curve(backbone, task, delta, list(SCALES))
        meta = update.meta
        train = meta.get("train") or {}
        rows.append({
            "update": path,
            "objective": meta.get("objective"),
            "protect": meta.get("protect"),
            "lr": train.get("lr"),
            "steps": train_steps(meta),
            "curve": [round(a, 4) for a in curve],
        })  # fmt: skip
        if args.splits:
            at_one = {"test": curve[SCALES.index(1.0)]}  # the curve has it already
            at_one |= {
                split: scaling_curve(backbone, task, delta, [1.0], split)[0] for split in ("train", "val")
            }
            rows[-1]["splits"] = {split: round(at_one[split], 4) for split in ("train", "val", "test")}
        print(path, " ".join(f"{s}:{100 * a:.1f}" for s, a in zip(SCALES, curve, strict=True)),
              rows[-1].get("splits", ""), flush=True)  # fmt: skip
    write_json(args.out, {
        **provenance("scaling-curves", wall_seconds=round(time.perf_counter() - t0, 1)),
        "command": shlex.join(["python", "benchmarks/scaling_curves.py", *sys.argv[1:]]),
        "threads": args.threads,
        "suite": args.suite,
        "task": args.task,
        "scales": list(SCALES),
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
