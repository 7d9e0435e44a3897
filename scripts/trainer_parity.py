"""The two training paths side by side: the built-in loop vs ``Trap2Trainer`` on the digits suite.

    .venv/bin/python scripts/trainer_parity.py [--out runs/parity] [--mode lora|full]
    .venv/bin/python scripts/trainer_parity.py --objective law=log --objective collateral=0.3

``--objective KEY=VALUE`` (repeatable) changes any ObjectiveConfig field of the protected runs, the
extensions included: both paths train the same objective.

For the target task (rot90) both paths train an unprotected and a Trap²-protected update from the same
``TrainConfig`` (configs/digits-demo.yaml's settings); the other seven tasks' unprotected updates come
from the built-in loop (cached under OUT/updates). Printed: standalone test accuracy, acc(s) at
s = 0.5 and 2, and the mean test accuracy of the TA and TIES merges of the 8 updates with the
coefficient searched on validation. The two columns should agree within run-to-run noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402

from trap2.attacks.merge_attack import EvalContext, run_attack  # noqa: E402
from trap2.config import ObjectiveConfig, TrainConfig, from_dict, load_yaml  # noqa: E402
from trap2.errors import ConfigError  # noqa: E402
from trap2.eval.evaluate import accuracy, base_state, scaling_curve  # noqa: E402
from trap2.hf.suite_train import train_with_trainer  # noqa: E402
from trap2.io import atomic_path  # noqa: E402
from trap2.pipeline import trained_update  # noqa: E402
from trap2.suites import get_suite  # noqa: E402
from trap2.updates import apply_delta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def objective_overrides(pairs: list[str]) -> dict[str, object]:
    """``["law=log", "collateral=0.3"]`` -> {"law": "log", "collateral": 0.3} (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--objective {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def compare(
    out: Path, mode: str = "lora", target: str = "rot90", objective: dict[str, object] | None = None
) -> dict:
    suite = get_suite("digits")
    train = load_yaml(ROOT / "configs" / ("digits-full.yaml" if mode == "full" else "digits-demo.yaml"))[
        "train"
    ]
    train["objective"] = {**train.get("objective", {}), **(objective or {})}
    cfg = from_dict(TrainConfig, train)
    plain = dataclasses.replace(cfg, objective=ObjectiveConfig(name="none"))
    tasks = suite.task_names
    plain_updates = {t: trained_update(suite, t, plain, out / "updates") for t in tasks}
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    # the attacker's normalisers: each task's own (built-in, unprotected) validation accuracy
    ft_val = {
        t: accuracy(backbone, suite.task(t), "val", apply_delta(w0, u.dense()))
        for t, u in plain_updates.items()
    }
    ctx = EvalContext(suite, ft_val)
    rows: dict[str, dict[str, float]] = {}
    for path in ("loop", "trainer"):
        for objective in ("none", "trap2"):
            c = plain if objective == "none" else cfg
            if path == "loop":
                upd = trained_update(suite, target, c, out / "updates")
            else:
                upd, _ = train_with_trainer(suite, target, c, out / f"trainer-{mode}-{objective}")
            delta = upd.dense()
            a05, a1, a2 = scaling_curve(backbone, suite.task(target), delta, [0.5, 1.0, 2.0])
            pool = [upd if t == target else plain_updates[t] for t in tasks]
            row = {"standalone": a1, "acc_s0.5": a05, "acc_s2": a2}
            for method in ("ta", "ties"):
                rec = run_attack(ctx, pool, method)
                row[f"{method}_mean"] = sum(rec["acc"].values()) / len(rec["acc"])
            rows[f"{path}/{objective}"] = {k: round(100 * v, 1) for k, v in row.items()}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "parity")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--objective", action="append", default=[], metavar="KEY=VALUE", help="an ObjectiveConfig field"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    overrides = objective_overrides(a.objective)
    rows = compare(a.out, a.mode, objective=overrides)
    keys = list(next(iter(rows.values())))
    extra = "".join(f", {k}={v}" for k, v in overrides.items())
    print(f"digits, {a.mode}{extra}, target rot90 (test accuracy %; merges: mean of 8 tasks)")
    print(f"| {'':16} | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name:16} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    suffix = "".join(f"-{k}{v}" for k, v in overrides.items())
    with atomic_path(a.out / f"parity-{a.mode}{suffix}.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
