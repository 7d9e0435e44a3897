"""``trap2 demo``, the main job on a suite: train every task's unprotected update and a protected one
for a target, then measure standalone accuracy, the target's scaling curve, and merged accuracy with
and without protection (coefficient searched on validation data). Trained updates are cached by config.
The work is :mod:`trap2.pipeline`'s; this module runs it on a suite and renders the terminal summary.

Run:  trap2 demo --out runs/demo        (or ``run_demo(DemoConfig(), "runs/demo")``)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trap2.pipeline import DemoConfig, evaluate_protection, trained_pool
from trap2.progress import LogReporter, Reporter
from trap2.suites import get_suite


def run_demo(
    cfg: DemoConfig, out: str | Path, fresh: bool = False, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Train the pool and the protected update on ``cfg.suite`` (cached under ``out/updates``), attack
    them and write the report to ``out``; returns the report."""
    t0 = time.perf_counter()
    reporter = reporter or LogReporter()
    out = Path(out)
    suite = get_suite(cfg.suite).subset(cfg.tasks)
    target = cfg.target or suite.default_target
    suite.task(target)  # validates the name
    updates, protected = trained_pool(suite, target, cfg.train, out / "updates", fresh, reporter)
    return evaluate_protection(suite, target, updates, protected, cfg, out, reporter, t0)


def summary_rows(report: Mapping[str, Any]) -> Sequence[tuple[str, str, str]]:
    """(what, unprotected, protected) rows for the terminal table."""
    t = report["target"]
    curve = report["scaling_curve"]

    def at(s: float, key: str) -> str:
        return f"{100 * curve[key][curve['s'].index(s)]:.1f}" if s in curve["s"] else "–"

    rows = [
        (
            f"standalone {t}",
            f"{100 * report['standalone']['unprotected'][t]:.1f}",
            f"{100 * report['standalone']['protected'][t]:.1f}",
        ),
        (f"{t} at s=0.5", at(0.5, "unprotected"), at(0.5, "protected")),
        (f"{t} at s=2", at(2.0, "unprotected"), at(2.0, "protected")),
    ]
    n = len(report["tasks"])
    for cell in dict.fromkeys((a["method"], a["space"], a["search"]) for a in report["attacks"]):
        pair = {
            a["protected"]: a for a in report["attacks"] if (a["method"], a["space"], a["search"]) == cell
        }
        label = " ".join(
            x
            for x in (cell[0], cell[1] if cell[0] != "ta" else "", cell[2] if cell[2] != "global" else "")
            if x
        )
        rows.append(
            (
                f"{label}: {t} / mean of {n}",
                f"{100 * pair[False]['acc'][t]:.1f} / {100 * pair[False]['acc']['mean']:.1f}",
                f"{100 * pair[True]['acc'][t]:.1f} / {100 * pair[True]['acc']['mean']:.1f}",
            )
        )
    rows.append(("zero-shot mean", f"{100 * report['zero_shot']['mean']:.1f}", ""))
    return rows
