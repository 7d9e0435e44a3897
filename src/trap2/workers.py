"""Independent jobs on worker processes, one intra-op thread each.

On a small CPU model, where per-call overhead dominates the matmuls, two processes at one thread each
do more work than one process at two threads (measured on the digits ViT: docs/performance.md).
``trap2 demo`` uses this for the trainings it has to do and for
the attack matrix's two pools. Workers are spawned (no fork after torch has started its threads) and
rebuild what they need from picklable arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)


def worker_pool(workers: int) -> Executor | None:
    """A pool of ``workers`` spawned processes of one thread each (None when ``workers`` < 2); close it
    with ``shutdown()`` or use it as a context manager. One pool serves several :func:`run_parallel`
    calls, so the processes start (and import torch) once."""
    if workers < 2:
        return None
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread)


def run_parallel(
    fn: Callable[..., T],
    jobs: Sequence[tuple[Any, ...]],
    pool: Executor | None,
    on_done: Callable[[int], None] | None = None,
) -> list[T]:
    """``[fn(*job) for job in jobs]`` on ``pool`` (:func:`worker_pool`; in this process when None);
    ``on_done(i)`` as each job finishes, in order."""
    if pool is None:
        out = []
        for i, job in enumerate(jobs):
            out.append(fn(*job))
            if on_done:
                on_done(i)
        return out
    futures = [pool.submit(fn, *job) for job in jobs]
    results: list[T] = []
    for i, f in enumerate(futures):
        results.append(f.result())
        if on_done:
            on_done(i)
    return results
