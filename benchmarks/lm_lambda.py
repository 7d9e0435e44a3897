"""The `lm` suite's λ (and protected steps) measured: for each value, the target's Trap²-protected LoRA
(the suite's recipe otherwise) against its plain one — exact match at s = 1 and the scaling curve.

Run:  python benchmarks/lm_lambda.py --target add --lams 0.01,0.03,0.1 --cache runs/lm-bench/updates \\
          --out results/lm-lambda.json --threads 2
A value is usable when the protected update keeps the plain one's standalone score at s = 1 (within a
few points) and loses it off s = 1; the recipe takes the smallest λ that does both. --protect-steps sets
the protected run's steps (default: the recipe's). Test split.

--variants tries other objective settings instead of a λ list: each SPEC is comma-separated key=value
pairs over ``ObjectiveConfig`` fields (lam, bound, law, collateral, operators with '+' between names,
weight, s_min, s_max, delta, lookahead_steps …) plus ``steps`` (the protected run's steps); a plain run
of the same steps is added for every step count that differs from the recipe's (equal compute).
    python benchmarks/lm_lambda.py --target add --variants "lam=0.1,bound=3" "lam=0.1,law=log" ...
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


def parse_variant(spec: str) -> tuple[dict[str, object], int | None]:
    """``"lam=0.1,bound=3,steps=600"`` → (ObjectiveConfig overrides, protected steps or None)."""
    from trap2.config import ObjectiveConfig
    from trap2.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    overrides: dict[str, object] = {}
    steps = None
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key == "steps":
            steps = int(raw)
            continue
        if key not in fields:
            raise ConfigError(f"variant {spec!r}: unknown key {key!r} (ObjectiveConfig fields or steps)")
        default = getattr(ObjectiveConfig(), key)
        if raw.lower() in ("none", "null"):
            value: object = None
        elif isinstance(default, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float) or default is None:
            value = float(raw)
        else:
            value = raw.replace("+", ",")
        overrides[key] = value
    return overrides, steps


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
    ap.add_argument("--variants", nargs="+", default=None, help="objective SPECs instead of --lams")
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
    plain_rows: dict[int, dict] = {}

    def plain_row(steps: int) -> dict:
        if steps not in plain_rows:
            cfg = dataclasses.replace(recipe.plain(), steps=steps)
            update = trained_update(suite, args.target, cfg, args.cache).dense()
            plain_rows[steps] = {
                "lam": None,
                "label": f"plain {steps} steps",
                "steps": steps,
                "curve": scaling_curve(backbone, task, update, SCALES),
            }
            rows.append(plain_rows[steps])
            print(f"plain {steps} steps: {[round(100 * a) for a in plain_rows[steps]['curve']]}")
        return plain_rows[steps]

    rows: list[dict] = []
    plain_row(recipe.steps)
    if args.variants:
        specs = [(v, *parse_variant(v)) for v in args.variants]
    else:
        specs = [(f"lam={v}", {"lam": float(v)}, None) for v in args.lams.split(",")]
    for spec, overrides, steps in specs:
        cfg = dataclasses.replace(recipe, objective=dataclasses.replace(recipe.objective, **overrides))
        if steps is not None:  # as many as plain: no protect_steps (the same cache entry as before)
            cfg = dataclasses.replace(cfg, protect_steps=None if steps == cfg.steps else steps)
        plain_row(cfg.run_steps)
        t1, cached = time.perf_counter(), update_cache_folder(suite, args.target, cfg, args.cache).is_dir()
        update = trained_update(suite, args.target, cfg, args.cache).dense()
        seconds = None if cached else time.perf_counter() - t1  # a cached update's time is its first run's
        rows.append(
            {
                "lam": cfg.objective.lam,
                "label": f"Trap² {spec}",
                "spec": spec,
                "objective": to_dict(cfg.objective),
                "steps": cfg.run_steps,
                "train_seconds": seconds,
                "curve": scaling_curve(backbone, task, update, SCALES),
            }
        )
        print(f"{spec}: {[round(100 * a) for a in rows[-1]['curve']]} ({seconds or 0:.0f} s)", flush=True)
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
