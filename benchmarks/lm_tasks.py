"""The `lm` suite's tasks measured: zero-shot exact match of the pretrained backbone against its plain LoRA
fine-tune (the suite's recipe, objective 'none'), and every task's adapter on every task (is the gain
each task's own?), and the unprotected task-arithmetic merge of all of them, W0 + c·Σ ΔW_t with c searched
on validation (the paper's grid, early-stopped): the suite measures protection only if that merge is
well above zero-shot.

Run:  python benchmarks/lm_tasks.py --cache runs/lm-bench/updates --out results/lm-tasks.json --threads 2
The adapters are trained (or taken from --cache: the same folder `trap2 bench --suite lm --out
runs/lm-bench` uses, so the bench reuses them) with `trap2 bench`'s LoRA recipe; --steps overrides its
step count and --lr its learning rate. Test split (200 questions per task).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main() -> None:
    from trap2.attacks.search import PAPER_GRID, search_coefficient
    from trap2.bench import BenchConfig
    from trap2.config import to_dict
    from trap2.eval.evaluate import accuracy, base_state
    from trap2.eval.report import provenance
    from trap2.io import write_json
    from trap2.pipeline import trained_update
    from trap2.suites import get_suite
    from trap2.updates import apply_delta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/lm-bench/updates"))
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    ap.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = get_suite("lm")
    tasks = args.tasks.split(",") if args.tasks else suite.task_names
    cfg = BenchConfig(suite="lm").train_config(suite, "lora").plain()
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.lr is not None:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    train_s, deltas = {}, {}
    for t in tasks:
        t1 = time.perf_counter()
        deltas[t] = trained_update(suite, t, cfg, args.cache).dense()
        train_s[t] = time.perf_counter() - t1
    zero = {t: accuracy(backbone, suite.task(t), "test") for t in tasks}
    cross = {
        a: {t: accuracy(backbone, suite.task(t), "test", apply_delta(w0, deltas[a])) for t in tasks}
        for a in tasks
    }
    summed = {k: sum(deltas[t][k] for t in tasks) for k in deltas[tasks[0]]}

    def merged(c: float) -> dict[str, torch.Tensor]:
        return apply_delta(w0, {k: c * v for k, v in summed.items()})

    def val_mean(c: float) -> float:
        params = merged(c)
        return sum(accuracy(backbone, suite.task(t), "val", params) for t in tasks) / len(tasks)

    search = search_coefficient(val_mean, PAPER_GRID, patience=4)
    params = merged(search.coefficient)
    ta = {t: accuracy(backbone, suite.task(t), "test", params) for t in tasks}
    for t in tasks:
        print(f"{t:10s} zero-shot {100 * zero[t]:5.1f}  fine-tuned {100 * cross[t][t]:5.1f}  "
              f"TA merge {100 * ta[t]:5.1f}  "
              f"others' adapters {' '.join(f'{100 * cross[a][t]:.0f}' for a in tasks if a != t)}")  # fmt: skip
    print(
        f"TA merge: c = {search.coefficient}, mean {100 * sum(ta.values()) / len(tasks):.1f} (val {search.score:.3f})"
    )
    result = {
        **provenance("lm-tasks", time.perf_counter() - t0),
        "tasks": tasks,
        "train": to_dict(cfg),
        "train_seconds": train_s,
        "zero_shot": zero,
        "fine_tuned": {t: cross[t][t] for t in tasks},
        "cross": cross,  # cross[adapter][task]
        "ta_merge": {"c": search.coefficient, "val_mean": search.score, "tried": search.tried, "test": ta},
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
