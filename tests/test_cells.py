"""Resumable evaluation (``trap2.eval.cells``): a run stopped part-way and run again writes the report an
uninterrupted run writes, computing only the missing cells; a record is reused only for the same pool,
settings and data; a damaged record is recomputed; ``fresh`` recomputes everything."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from threat_suite import threat_suite

import trap2.attacks.grid as grid_module
import trap2.attacks.merge_attack as merge_attack
from trap2.attacks.grid import GRIDS, AttackGrid
from trap2.eval.cells import CellStore, record_path, suite_key
from trap2.pipeline import CELLS, DemoConfig, evaluate_protection
from trap2.suites import Split
from trap2.updates import Update

GRID = AttackGrid(lrs=(1e-2,), steps=(0, 5), samples=(10,), modes=("full",), optimisers=("adamw",))


@pytest.fixture
def setup(monkeypatch):
    """(suite, unprotected updates, a weakened t0 standing in for the protected release, config)."""
    monkeypatch.setitem(GRIDS, "tiny", GRID)
    suite, updates = threat_suite()
    protected = Update({n: 0.3 * d for n, d in updates["t0"].deltas.items()}, {"task": "t0"})
    cfg = DemoConfig(
        suite="threat-tiny",
        methods=("ta", "ties"),
        spaces=("full",),
        extra_searches=("per_task", "pinned"),
        scales=(0.5, 1.0, 2.0),
        threats="tiny",
    )
    return suite, updates, protected, cfg


class Recorder:
    """A reporter that keeps each stage's description, total and how far it advanced."""

    def __init__(self) -> None:
        self.stages: list[list] = []

    def stage(self, description, total):
        import contextlib

        @contextlib.contextmanager
        def run():
            row = [description, total, 0]
            self.stages.append(row)
            yield lambda n=1: row.__setitem__(2, row[2] + n)

        return run()


def counting(monkeypatch, module, name, fail_after=None):
    """Count calls of ``module.name``; with ``fail_after``, raise at call ``fail_after + 1`` (a run killed
    after that many cells)."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def run(setup, out, updates=None, protected=None, cfg=None, fresh=False, reporter=None, executor=None):
    suite, u0, p0, c0 = setup
    return evaluate_protection(
        suite, "t0", updates or u0, protected or p0, cfg or c0, out, reporter or Recorder(), time.perf_counter(),
        executor=executor, fresh=fresh,
    )  # fmt: skip


def timeless(x):
    """``x`` without its wall times (a run's own and each attack's in the grid)."""
    if isinstance(x, dict):
        return {k: timeless(v) for k, v in x.items() if k != "wall_seconds"}
    return [timeless(v) for v in x] if isinstance(x, list) else x


def same(a, b):
    """Reports equal in everything but wall times."""
    return timeless(a) == timeless(b)


def counts(setup):
    cfg = setup[3]
    return 2 * len(cfg.cells()), len(GRID.attacks) * len(GRID.points())


def test_a_stopped_run_resumes_and_writes_the_uninterrupted_report(setup, tmp_path, monkeypatch):
    n_attacks, n_points = counts(setup)
    whole = run(setup, tmp_path / "whole", cfg=setup[3])  # uninterrupted, its own folder
    assert (
        len(whole["attacks"]) == n_attacks
        and sum(len(a["points"]) for a in whole["threats"]["attacks"].values()) == n_points
    )

    out = tmp_path / "out"
    with monkeypatch.context() as m:  # killed in the attack matrix, after 3 cells
        counting(m, merge_attack, "run_attack", fail_after=3)
        with pytest.raises(KeyboardInterrupt):
            run(setup, out)
    assert len(list((out / CELLS).glob("attack-*.json"))) == 3
    assert not (out / "report.json").exists()
    with monkeypatch.context() as m:  # killed in the attacker grid, after 2 points
        attacks = counting(m, merge_attack, "run_attack")
        counting(m, grid_module, "run_point", fail_after=2)
        with pytest.raises(KeyboardInterrupt):
            run(setup, out)
    assert len(attacks) == n_attacks - 3
    rep = Recorder()
    with monkeypatch.context() as m:
        attacks = counting(m, merge_attack, "run_attack")
        points = counting(m, grid_module, "run_point")
        resumed = run(setup, out, reporter=rep)
    assert (len(attacks), len(points)) == (0, n_points - 2)
    assert same(resumed, whole)
    assert json.loads((out / "report.json").read_text())["attacks"] == whole["attacks"]
    # every stage advanced to its total, cells read from disk included; one line says how many
    for description, total, done in rep.stages:
        assert done == total, description
    resumed_lines = [d for d, _, _ in rep.stages if "resumed" in d]
    assert resumed_lines == [
        f"{1 + n_attacks + 2 + 2} of {1 + n_attacks + 2 + n_points} finished cells resumed from {out / CELLS}"
    ]

    # run once more: everything is read back, the grid's wall times too (the original computations')
    with monkeypatch.context() as m:
        attacks = counting(m, merge_attack, "run_attack")
        points = counting(m, grid_module, "run_point")
        again = run(setup, out)
    assert (len(attacks), len(points)) == (0, 0)
    assert again["threats"] == resumed["threats"] and same(again, resumed)
    stored = [json.loads(p.read_text()) for p in (out / CELLS).glob("grid_point-*.json")]
    assert again["threats"]["attacks"]["untrap"]["wall_seconds"] == pytest.approx(
        sum(s["wall_seconds"] for s in stored if s["key"]["attack"] == "untrap")
    )


def test_records_are_not_reused_for_another_pool_or_config(setup, tmp_path, monkeypatch):
    n_attacks, n_points = counts(setup)
    out = tmp_path / "out"
    run(setup, out)
    suite, updates, protected, cfg = setup

    # another unprotected member: both pools (and the normalisers) change, nothing is reused
    other = {**updates, "t1": Update({n: 1.1 * d for n, d in updates["t1"].deltas.items()}, {"task": "t1"})}
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(setup, out, updates=other)
    assert (len(attacks), len(points)) == (n_attacks, n_points)
    assert same(got, run(setup, tmp_path / "clean1", updates=other))

    # another release: the unprotected pool's cells are reused, the protected pool's are not
    release = Update({n: 0.5 * d for n, d in updates["t0"].deltas.items()}, {"task": "t0"})
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(setup, out, protected=release)
    assert (len(attacks), len(points)) == (n_attacks // 2, n_points)
    assert same(got, run(setup, tmp_path / "clean2", protected=release))

    # another config field that changes the attack (hparam_search): the matrix is redone, the grid's
    # points (which do not depend on it) are reused
    searched = dataclasses.replace(cfg, hparam_search=True)
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(setup, out, cfg=searched)
    assert (len(attacks), len(points)) == (n_attacks, 0)
    assert same(got, run(setup, tmp_path / "clean3", cfg=searched))


def with_split(suite, task, split, data):
    """``suite`` with ``task``'s ``split`` replaced by ``data`` (a new suite and task; the old unchanged)."""
    changed = dataclasses.replace(suite.task(task), **{split: data})
    return dataclasses.replace(suite, tasks={**suite.tasks, task: changed})


def test_records_are_keyed_by_the_data(setup, tmp_path, monkeypatch):
    """A changed test or val example makes every record on the suite stale; the same data rebuilt (new
    tensors, same bytes) resumes everything."""
    n_attacks, n_points = counts(setup)
    suite, updates, protected, cfg = setup
    out = tmp_path / "out"
    whole = run(setup, out)
    stored = [json.loads(p.read_text())["key"] for p in (out / CELLS).glob("*.json")]
    kinds = {k["kind"] for k in stored}
    assert kinds == {"standalone", "attack", "grid_reference", "grid_point"}
    assert all(k["data"] == suite_key(suite)["data"] for k in stored)  # every kind carries the data

    # the same data built again, in new tensors: same keys, everything resumed
    rebuilt = threat_suite()[0]
    assert rebuilt.task("t1").test.x is not suite.task("t1").test.x
    assert suite_key(rebuilt) == suite_key(suite)
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        again = run((rebuilt, updates, protected, cfg), out)
    assert (len(attacks), len(points)) == (0, 0) and same(again, whole)

    # one test label of a pool member changed: every record is computed again, and the report is the
    # one a clean run on that data writes (the fine-tuned t1, exact on its task, loses that one example)
    t1 = suite.task("t1").test
    flipped = Split(t1.x, t1.y.clone())
    flipped.y[0] = (flipped.y[0] + 1) % 3
    relabelled = (with_split(suite, "t1", "test", flipped), updates, protected, cfg)
    digests = suite_key(relabelled[0])["data"]
    assert [t for t in digests if digests[t] != suite_key(suite)["data"][t]] == ["t1"]
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(relabelled, out)
    assert (len(attacks), len(points)) == (n_attacks, n_points)
    assert whole["standalone"]["unprotected"]["t1"] == 1.0
    assert got["standalone"]["unprotected"]["t1"] == pytest.approx(1 - 1 / len(t1))
    assert same(got, run(relabelled, tmp_path / "clean"))

    # the target's val examples in another order: every accuracy (the normalisers too) is unchanged, yet
    # the data is not the same, so nothing is reused; the records come out as before
    v = suite.task("t0").val
    order = torch.arange(len(v)).roll(1)
    swapped = (with_split(suite, "t0", "val", Split(v.x[order], v.y[order])), updates, protected, cfg)
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(swapped, out)
    assert (len(attacks), len(points)) == (n_attacks, n_points)
    assert same(got, whole)


KEY_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = sys.argv[1:3]
from threat_suite import threat_suite
from trap2.eval.cells import record_path, suite_key
print(record_path(Path("cells"), {"kind": "x", **suite_key(threat_suite()[0])}).name)
"""


def test_a_record_has_the_same_name_in_any_process(setup):
    """The data's part of a key is a pure function of the bytes: another process (another str hash)
    names the same record."""
    here = record_path(Path("cells"), {"kind": "x", **suite_key(setup[0])}).name
    tests, src = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, tests, src], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == here


def test_a_damaged_record_is_recomputed(setup, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    whole = run(setup, out)
    files = sorted((out / CELLS).glob("attack-*.json"))
    files[0].write_text(files[0].read_text()[:40])  # truncated
    entry = json.loads(files[1].read_text())
    entry["key"]["method"] = "tsv"  # a record written under another key (a hash collision)
    files[1].write_text(json.dumps(entry))
    point = next((out / CELLS).glob("grid_point-*.json"))
    point.write_bytes(b"\xff\xfe\x00")  # not even text
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="trap2"):
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(setup, out)
    assert (len(attacks), len(points)) == (2, 1)
    assert same(got, whole)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        sum("unreadable record" in w for w in warnings) == 2
        and sum("another key" in w for w in warnings) == 1
    )
    with monkeypatch.context() as m:  # the damaged files were written again
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        run(setup, out)
    assert (len(attacks), len(points)) == (0, 0)


def test_fresh_recomputes_every_record(setup, tmp_path, monkeypatch):
    n_attacks, n_points = counts(setup)
    out = tmp_path / "out"
    whole = run(setup, out)
    stale = out / CELLS / "attack-stale.json"
    stale.write_text("{}")
    with monkeypatch.context() as m:
        attacks, points = counting(m, merge_attack, "run_attack"), counting(m, grid_module, "run_point")
        got = run(setup, out, fresh=True)
    assert (len(attacks), len(points)) == (n_attacks, n_points)
    assert same(got, whole) and not stale.exists()


def test_the_worker_path_resumes_from_the_same_records(setup, tmp_path, monkeypatch):
    """Attacking the two pools on an executor reads and writes the same records."""
    suite = setup[0]
    monkeypatch.setattr("trap2.suites.get_suite", lambda _name: suite)  # the workers rebuild the suite
    out = tmp_path / "out"
    serial = run(setup, out)
    with monkeypatch.context() as m, ThreadPoolExecutor(2) as pool:
        attacks = counting(m, merge_attack, "run_attack")
        parallel = run(setup, out, executor=pool)
    assert len(attacks) == 0 and same(parallel, serial)
    with ThreadPoolExecutor(2) as pool:
        fresh = run(setup, tmp_path / "other", executor=pool)
    assert same(fresh, serial)


def test_store_without_folder_computes_and_returns_json_records(tmp_path):
    store = CellStore()
    rec, seconds = store.run({"kind": "x"}, lambda: {"a": (1, 2.5), "b": {"c": None}})
    assert rec == {"a": [1, 2.5], "b": {"c": None}} and seconds >= 0 and store.computed == 1
    kept = CellStore(tmp_path / "cells")
    first, wall = kept.run({"kind": "x", "n": 1}, lambda: {"v": 0.1 + 0.2})
    again, wall2 = CellStore(tmp_path / "cells").run({"kind": "x", "n": 1}, lambda: {"v": 0.0})
    assert again == first == {"v": 0.1 + 0.2} and wall2 == wall
    other, _ = CellStore(tmp_path / "cells").run({"kind": "x", "n": 2}, lambda: {"v": 0.0})
    assert other == {"v": 0.0} and len(list((tmp_path / "cells").glob("x-*.json"))) == 2


def test_the_unprotected_pools_cells_are_shared_between_targets(setup, tmp_path, monkeypatch):
    """With another member protected, the unprotected pool's cells whose search does not read the
    protected index (global, per_task) are reused; those that do (pinned) are computed again, and the
    report equals a clean run's."""
    suite, updates, _, cfg = setup
    cfg = dataclasses.replace(cfg, threats=None)
    out = tmp_path / "out"
    run(setup, out, cfg=cfg)
    release = Update({n: 0.3 * d for n, d in updates["t1"].deltas.items()}, {"task": "t1"})

    def for_t1(folder):
        return evaluate_protection(
            suite, "t1", updates, release, cfg, folder, Recorder(), time.perf_counter()
        )

    cells = cfg.cells()
    reading = [c for c in cells if c[2] == "pinned"]
    assert reading and len(reading) < len(cells)
    with monkeypatch.context() as m:
        attacks = counting(m, merge_attack, "run_attack")
        got = for_t1(out)
    assert len(attacks) == len(cells) + len(reading)  # the protected pool's, and the index readers'
    assert same(got, for_t1(tmp_path / "clean"))
