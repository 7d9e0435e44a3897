"""Make the plain (unprotected) pool updates that ``trap2 demo`` ships, so the demo trains only the
target's plain and protected updates.

Run:  python scripts/make_pool.py [--suite digits] [--workers 2]
Trains every task's plain update but the suite's default target with the demo's default recipe
(``DemoConfig().train.plain()``: seed, steps, lr ... as ``trap2 demo`` uses them; two worker processes of
one thread each) and writes each, its LoRA factors stored as float16 (~45 KB), as a PEFT adapter folder
``src/trap2/suites/assets/pool/<suite>/<task>/``. Each records the demo's cache key of its config
and its task's data (``cache_key``), the seed and this command: the demo takes a shipped update only when
its own plain config and the suite's data give the same key, and retrains otherwise (or with ``--fresh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from trap2 import __version__
from trap2.demo import POOL_ASSETS, _train_job
from trap2.pipeline import DemoConfig, trained_update, update_cache_key
from trap2.suites import get_suite
from trap2.updates import LowRank, Update
from trap2.workers import run_parallel, worker_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="digits")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=POOL_ASSETS)
    args = ap.parse_args()
    cfg = dataclasses.replace(DemoConfig(), suite=args.suite)
    suite = get_suite(cfg.suite)
    plain = cfg.train.plain()
    tasks = [t for t in suite.task_names if t != suite.default_target]
    with tempfile.TemporaryDirectory() as cache:
        jobs = [(cfg.suite, (), t, plain, cache, True) for t in tasks]
        workers = worker_pool(args.workers)
        run_parallel(_train_job, jobs, workers)
        if workers is not None:
            workers.shutdown()
        for t in tasks:
            u = trained_update(suite, t, plain, Path(cache))  # the cached result of the job above
            half = {
                k: LowRank(d.A.half(), d.B.half(), d.scaling, d.fan_in_fan_out) for k, d in u.deltas.items()
            }
            meta = {
                **u.meta,
                "cache_key": update_cache_key(suite, t, plain),
                "seed": plain.seed,
                "command": " ".join(["python", "scripts/make_pool.py", *sys.argv[1:]]),
                "trap2_version": __version__,
                "stored_as": "float16 LoRA factors",
            }
            folder = args.out / suite.name / t
            shutil.rmtree(folder, ignore_errors=True)
            Update(half, meta).save(folder)
            print(f"wrote {folder}")


if __name__ == "__main__":
    main()
