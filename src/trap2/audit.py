"""``trap2 audit``: how well is a released update protected?

For the update (a PEFT folder or ``delta.safetensors`` made on a suite's backbone): its standalone
accuracy, its scaling curve acc(s) against the same task's unprotected update, and the attack matrix
(every configured method × space, coefficient searched on validation) against a pool of other tasks'
updates — those given with ``--pool`` (or, for a model folder and data files, the adapters given per task
with ``--task NAME=ADAPTER:DATA``), the rest the suite's unprotected updates (trained once, cached).
The report is the demo's (``report.json`` / ``.md``, the scaling curve and a merge heat map).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trap2.errors import ConfigError
from trap2.eval.evaluate import base_state
from trap2.pipeline import DemoConfig, evaluate_protection, trained_update
from trap2.progress import LogReporter, Reporter
from trap2.suites import get_suite
from trap2.suites.base import Suite
from trap2.updates import Update, load_update


def _task_of(update: Update, where: str, tasks: Sequence[str]) -> str:
    task = update.meta.get("task")
    if task is None:
        raise ConfigError(f"{where}: the update does not record its task; pass --task")
    if task not in tasks:
        raise ConfigError(f"{where}: made for task {task!r}, not one of {', '.join(tasks)}")
    return task


def run_audit(
    update_path: str | Path,
    cfg: DemoConfig,
    out: str | Path,
    task: str | None = None,
    pool: Sequence[str | Path] = (),
    fresh: bool = False,
    reporter: Reporter | None = None,
    *,
    suite: Suite | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Audit the update at ``update_path`` on ``suite`` (default: the registered ``cfg.suite``).

    The pool: ``adapters`` ({task: update folder}, e.g. the adapters named by ``trap2 audit --base``) and
    ``pool`` (update folders that record their task); a task with neither gets an unprotected update
    trained on its data (cached under ``out/updates``). Finished attack cells and grid points are kept
    under ``out/cells``, so an audit run again resumes (``fresh``: retrain and recompute everything).
    Every given update is checked against the base (names, shapes, recorded fingerprint) before
    anything is trained or written."""
    t0 = time.perf_counter()
    reporter = reporter or LogReporter()
    out = Path(out)
    suite = (suite if suite is not None else get_suite(cfg.suite)).subset(cfg.tasks)
    tasks = suite.task_names
    audited = load_update(update_path)
    if task is not None:
        suite.task(task)  # validates the name
    target = task or _task_of(audited, str(update_path), tasks)

    given: dict[str, Update] = {}
    where: dict[str, str] = {}
    for t, p in (adapters or {}).items():
        suite.task(t)  # validates the name
        given[t], where[t] = load_update(p), str(p)
    for p in pool:
        u = load_update(p)
        t = _task_of(u, str(p), tasks)
        if t in given:
            raise ConfigError(f"--pool: two updates for task {t!r}")
        given[t], where[t] = u, str(p)
    w0 = base_state(suite.make_backbone())
    for t, u in [(None, audited), *given.items()]:
        u.check_base(w0, suite.fingerprint, where=str(update_path) if t is None else where[t])
    del w0
    plain_cfg = cfg.train.plain()
    cache = out / "updates"
    updates = {
        t: given[t] if t in given else trained_update(suite, t, plain_cfg, cache, fresh, reporter)
        for t in tasks
    }
    extra = {
        "audited": str(update_path),
        "audited_meta": audited.meta,
        "pool": {t: ("given" if t in given else "trained") for t in tasks},
    }
    return evaluate_protection(suite, target, updates, audited, cfg, out, reporter, t0, extra, fresh=fresh)
