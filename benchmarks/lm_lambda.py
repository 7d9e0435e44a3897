"""The `lm` suite's λ (and protected steps) measured: for each value, the target's Trap²-protected LoRA
(the suite's recipe otherwise) against its plain one — exact match at s = 1 and the scaling curve.

Run:  python benchmarks/lm_lambda.py --target add --lams 0.01,0.03,0.1 --cache runs/lm-bench/updates \\
          --out results/lm-lambda.json --threads 2
A value is usable when the protected update keeps the plain one's standalone score at s = 1 (within a
few points) and loses it off s = 1; the recipe takes the smallest λ that does both. --protect-steps sets
the protected run's steps (default: the recipe's). Test split.
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

SCALES = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0)


def main() -> None:
    from trap2.bench import BenchConfig
    from trap2.config import to_dict
    from trap2.eval.evaluate import scaling_curve
    from trap2.eval.report import provenance
    from trap2.io import write_json
    from trap2.pipeline import trained_update, update_cache_folder
    from trap2.suites import get_suite

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="add")
    ap.add_argument("--lams", default="0.01,0.03,0.1")
    ap.add_argument("--protect-steps", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=Path("runs/lm-bench/updates"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    suite = get_suite("lm")
    recipe = BenchConfig(suite="lm").train_config(suite, "lora")
    if args.protect_steps is not None:
        recipe = dataclasses.replace(recipe, protect_steps=args.protect_steps)
    backbone = suite.make_backbone()
    task = suite.task(args.target)
    plain = trained_update(suite, args.target, recipe.plain(), args.cache).dense()
    rows = [{"lam": None, "curve": scaling_curve(backbone, task, plain, SCALES)}]
    print(f"plain: {[round(100 * a) for a in rows[0]['curve']]}")
    for lam in (float(v) for v in args.lams.split(",")):
        cfg = dataclasses.replace(recipe, objective=dataclasses.replace(recipe.objective, lam=lam))
        t1, cached = time.perf_counter(), update_cache_folder(suite, args.target, cfg, args.cache).is_dir()
        update = trained_update(suite, args.target, cfg, args.cache).dense()
        seconds = None if cached else time.perf_counter() - t1  # a cached update's time is its first run's
        rows.append(
            {"lam": lam, "train_seconds": seconds, "curve": scaling_curve(backbone, task, update, SCALES)}
        )
        print(f"lam {lam}: {[round(100 * a) for a in rows[-1]['curve']]} ({seconds or 0:.0f} s)")
    write = {
        **provenance("lm-lambda", time.perf_counter() - t0),
        "target": args.target,
        "train": to_dict(recipe),
        "scales": list(SCALES),
        "rows": rows,
    }
    if args.out:
        write_json(args.out, write)


if __name__ == "__main__":
    sys.exit(main())
