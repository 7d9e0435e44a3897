"""The trained-update cache of :mod:`trap2.pipeline`: keyed by the suite, its backbone, the task's training
data (:meth:`Task.data_digest`) and the config; and the digests of a task's splits
(:meth:`Task.eval_digest`, every split, keys the evaluation records of :mod:`trap2.eval.cells`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from threat_suite import threat_suite

from trap2.config import TrainConfig
from trap2.pipeline import trained_update, update_cache_folder, update_cache_key
from trap2.suites.base import Split, Task, splits_digest

CFG = TrainConfig(steps=4, batch_size=16, warmup_steps=1, eval_every=2)


def _with_split(suite, task: str, **splits: Split):
    """``suite`` with ``task``'s splits replaced (a new Task: the suite's own is left as it is)."""
    edited = dataclasses.replace(suite.task(task), **splits)
    return dataclasses.replace(suite, tasks={**suite.tasks, task: edited})


class Stages:
    """A reporter that records the stages it is given (a training is one)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def stage(self, description: str, total: int):
        self.names.append(description)
        return contextlib.nullcontext(lambda n=1: None)


def test_one_changed_training_example_changes_the_key_and_retrains(tmp_path):
    suite, _ = threat_suite(n=(64, 32, 32))
    first = Stages()
    before = trained_update(suite, "t0", CFG, tmp_path, reporter=first)
    again = Stages()
    assert trained_update(suite, "t0", CFG, tmp_path, reporter=again).meta == before.meta
    assert len(first.names) == 1 and again.names == []  # the second call read the cache

    train = suite.task("t0").train
    x = train.x.clone()
    x[5, 2] += 0.5  # one input of one example
    edited = _with_split(suite, "t0", train=Split(x, train.y))
    assert update_cache_key(edited, "t0", CFG) != update_cache_key(suite, "t0", CFG)
    retrained = Stages()
    after = trained_update(edited, "t0", CFG, tmp_path, reporter=retrained)
    assert len(retrained.names) == 1  # trained, not read from the old entry
    assert update_cache_folder(edited, "t0", CFG, tmp_path).is_dir()
    assert update_cache_folder(suite, "t0", CFG, tmp_path).is_dir()  # the old entry is left alone
    assert sorted(after.dense()) == sorted(before.dense())
    assert any(not torch.equal(after.dense()[n], d) for n, d in before.dense().items())

    y = train.y.clone()
    y[0] = (y[0] + 1) % suite.task("t0").n_classes  # one label
    relabelled = _with_split(suite, "t0", train=Split(train.x, y))
    assert update_cache_key(relabelled, "t0", CFG) != update_cache_key(suite, "t0", CFG)
    val = suite.task("t0").val  # training reads val (evaluation, select='best'): part of the key
    moved = _with_split(suite, "t0", val=Split(val.x + 1.0, val.y))
    assert update_cache_key(moved, "t0", CFG) != update_cache_key(suite, "t0", CFG)
    test = suite.task("t0").test  # training never reads test: the cached update stays valid
    tested = _with_split(suite, "t0", test=Split(test.x + 1.0, test.y))
    assert update_cache_key(tested, "t0", CFG) == update_cache_key(suite, "t0", CFG)
    # another task's data is not this task's key
    other = suite.task("t1").train
    assert update_cache_key(
        _with_split(suite, "t1", train=Split(other.x + 1.0, other.y)), "t0", CFG
    ) == update_cache_key(suite, "t0", CFG)


KEY_SCRIPT = """
import sys
sys.path[:0] = sys.argv[1:3]
from threat_suite import threat_suite
from trap2.config import TrainConfig
from trap2.pipeline import update_cache_key
suite, _ = threat_suite(n=(64, 32, 32))
cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=1, eval_every=2)
print(" ".join(update_cache_key(suite, t, cfg) for t in suite.task_names))
"""


def test_the_same_data_built_again_gives_the_same_key_in_any_process():
    suite, _ = threat_suite(n=(64, 32, 32))
    rebuilt, _ = threat_suite(n=(64, 32, 32))
    assert rebuilt.task("t0") is not suite.task("t0")
    here = [update_cache_key(suite, t, CFG) for t in suite.task_names]
    assert here == [update_cache_key(rebuilt, t, CFG) for t in rebuilt.task_names]
    assert len(set(here)) == 3  # each task its own key
    tests = str(Path(__file__).resolve().parent)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another str hash: the key must not use hash()
    out = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, tests, src], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == here


def test_the_digest_is_blake2b_of_each_split_in_name_order():
    train = Split(torch.arange(6, dtype=torch.float32).reshape(3, 2), torch.tensor([0, 1, 0]))
    val = Split(torch.tensor([[0.5, -1.0]]), torch.tensor([1]))
    ref = hashlib.blake2b(digest_size=16)  # the documented format, written out independently
    for name, split in (("train", train), ("val", val)):
        ref.update(f"{name};".encode())
        for t in (split.x, split.y):
            ref.update(f"{t.dtype}{tuple(t.shape)};".encode() + t.numpy().tobytes())
    assert splits_digest({"train": train, "val": val}) == ref.hexdigest()
    assert splits_digest({"val": val, "train": train}) == ref.hexdigest()  # dict order does not matter
    # the same bytes under another shape or dtype are other data
    assert splits_digest({"train": Split(train.x.reshape(3, 2, 1), train.y), "val": val}) != ref.hexdigest()
    as_int = Split(train.x.view(torch.int32), train.y)
    assert splits_digest({"train": as_int, "val": val}) != ref.hexdigest()
    # a non-contiguous view hashes as its values
    transposed = Split(train.x.T.contiguous().T, train.y)
    assert splits_digest({"train": transposed, "val": val}) == ref.hexdigest()

    head = torch.nn.Identity()
    test = Split(val.x * 0, val.y)
    task = Task("t", 2, train, val, test, head)
    assert task.data_digest() == ref.hexdigest()  # train and val: what training reads
    every = hashlib.blake2b(digest_size=16)  # train, val and test: what an evaluation record reads
    for name, split in (("test", test), ("train", train), ("val", val)):
        every.update(f"{name};".encode())
        for t in (split.x, split.y):
            every.update(f"{t.dtype}{tuple(t.shape)};".encode() + t.numpy().tobytes())
    assert task.eval_digest() == every.hexdigest() != task.data_digest()
    # the suite's task order (the order tasks were given in) does not enter a task's key
    a = Task("a", 2, train, val, val, head)
    suites = [
        dataclasses.replace(threat_suite(n=(8, 4, 4))[0], tasks=tasks)
        for tasks in ({"t": task, "a": a}, {"a": a, "t": task})
    ]
    assert update_cache_key(suites[0], "t", CFG) == update_cache_key(suites[1], "t", CFG)


def test_the_digest_is_computed_once_per_split(monkeypatch):
    import trap2.suites.base as base

    calls = []
    real = base.splits_digest
    monkeypatch.setattr(base, "splits_digest", lambda s: calls.append(1) or real(s))
    split = Split(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    task = Task("t", 2, split, split, split, torch.nn.Identity())
    first = task.data_digest()
    assert task.data_digest() == first and len(calls) == 1
    task.train = Split(torch.ones(4, 2), split.y)  # a replaced split is hashed again
    assert task.data_digest() != first and len(calls) == 2
    assert dataclasses.replace(task, val=task.train).data_digest() != task.data_digest()
    # eval_digest (every split) is kept apart from data_digest and computed once too
    n = len(calls)
    every, trained = task.eval_digest(), task.data_digest()
    assert task.eval_digest() == every != trained and len(calls) == n + 1
    task.test = Split(torch.ones(4, 2), split.y)  # test: eval_digest's, not data_digest's
    assert task.eval_digest() != every and task.data_digest() == trained and len(calls) == n + 2
