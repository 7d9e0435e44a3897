"""``trap2 demo``, the main job on a suite: train every task's unprotected update and a protected one
for a target, then measure standalone accuracy, the target's scaling curve, and merged accuracy with
and without protection (coefficient searched on validation data). Trained updates are cached by config
and data. The work is :mod:`trap2.pipeline`'s; this module runs it on a suite and renders the terminal
summary.

The pool's other plain updates ship with the package where a suite has them
(``suites/assets/pool/<suite>/<task>``, made by ``scripts/make_pool.py``): each records the cache key of
the config it was trained with and is used only when the demo's plain config has that key (``--fresh``
retrains them). With two or more threads the trainings left and the attack matrix's two pools run on two
processes of one thread each (:mod:`trap2.workers`).

Run:  trap2 demo --out runs/demo        (or ``run_demo(DemoConfig(), "runs/demo")``)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from trap2.config import TrainConfig
from trap2.eval.report import summary_rows as _summary_rows
from trap2.pipeline import (
    DemoConfig,
    evaluate_protection,
    trained_pool,
    trained_update,
    update_cache_folder,
    update_cache_key,
)
from trap2.progress import LogReporter, Reporter
from trap2.suites import get_suite
from trap2.suites.base import Suite
from trap2.updates import LowRank, Update, load_update
from trap2.workers import run_parallel, worker_pool

POOL_ASSETS = Path(__file__).resolve().parent / "suites" / "assets" / "pool"


def shipped_pool(suite: Suite, target: str, plain: TrainConfig) -> dict[str, Update]:
    """The suite's shipped plain updates (every task but ``target``) whose recorded cache key is the one
    ``plain`` gives, as float32 updates; tasks without a matching file are left to train."""
    out = {}
    for t in suite.task_names:
        folder = POOL_ASSETS / suite.name / t
        if t == target or not folder.is_dir():
            continue
        u = load_update(folder)
        if u.meta.get("cache_key") != update_cache_key(suite, t, plain):
            continue
        deltas = {
            k: LowRank(d.A.float(), d.B.float(), d.scaling, d.fan_in_fan_out)
            if isinstance(d, LowRank)
            else d.float()
            for k, d in u.deltas.items()
        }
        out[t] = Update(deltas, u.meta, u.peft_config)
    return out


def _train_job(
    suite_name: str, tasks: tuple[str, ...], task: str, cfg: TrainConfig, cache: str, fresh: bool
) -> None:
    """One training in a worker process: the update lands in the cache, where the demo reads it."""
    suite = get_suite(suite_name).subset(tasks)
    trained_update(suite, task, cfg, Path(cache), fresh)


def default_workers(cfg: DemoConfig) -> int:
    """2 when the demo has two threads or more on the CPU (see :mod:`trap2.workers`), else 1."""
    import torch

    return 2 if torch.get_num_threads() >= 2 and str(cfg.train.device) == "cpu" else 1


class TimedReporter:
    """A reporter that passes stages on and records each one's wall time (the report's ``stages``)."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.stages: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        t = time.perf_counter()
        with self.inner.stage(description, total) as advance:
            yield advance
        self.stages.append({"stage": description, "seconds": round(time.perf_counter() - t, 2)})


def run_demo(
    cfg: DemoConfig,
    out: str | Path,
    fresh: bool = False,
    reporter: Reporter | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Train the pool and the protected update on ``cfg.suite`` (cached under ``out/updates``; the
    shipped plain updates taken where their config matches), attack them and write the report to
    ``out``; returns the report. ``workers`` > 1 (``trap2 demo``: :func:`default_workers`): processes
    for the trainings and the attack matrix; they are spawned, so a script calling this needs the
    ``if __name__ == "__main__":`` guard."""
    t0 = time.perf_counter()
    reporter = TimedReporter(reporter or LogReporter())
    out = Path(out)
    suite = get_suite(cfg.suite).subset(cfg.tasks)
    target = cfg.target or suite.default_target
    suite.task(target)  # validates the name
    cache = out / "updates"
    plain = cfg.train.plain()
    given = {} if fresh else shipped_pool(suite, target, plain)
    recompute = fresh  # the attack records too (``fresh`` is spent on the trainings below)
    pool_ = worker_pool(workers)
    try:
        if pool_ is not None:
            todo = [(t, plain) for t in suite.task_names if t not in given] + [(target, cfg.train)]
            todo = [(t, c) for t, c in todo if fresh or not update_cache_folder(suite, t, c, cache).is_dir()]
            if todo:
                jobs = [(cfg.suite, suite.task_names, t, c, str(cache), fresh) for t, c in todo]
                names = ", ".join(f"{t} ({c.objective.name})" for t, c in todo)
                with reporter.stage(f"train {names} on {workers} processes", len(todo)) as advance:
                    run_parallel(_train_job, jobs, pool_, lambda _i: advance(1))
                fresh = False  # every update is in the cache now
        updates, protected = trained_pool(suite, target, cfg.train, cache, fresh, reporter, given)
        pool = {t: ("shipped" if t in given else "trained") for t in suite.task_names}
        # reporter.stages is filled as the stages end, before the report is written
        extra = {"kind": "demo", "pool": pool, "workers": workers, "stages": reporter.stages}
        return evaluate_protection(
            suite, target, updates, protected, cfg, out, reporter, t0, extra, pool_, fresh=recompute
        )
    finally:
        if pool_ is not None:
            pool_.shutdown()


def summary_rows(report: Mapping[str, Any]) -> Sequence[tuple[str, str, str]]:
    """(what, unprotected, protected) rows for the terminal table: every attack cell."""
    return [(what.replace("`", ""), a, b) for what, a, b in _summary_rows(report)]
