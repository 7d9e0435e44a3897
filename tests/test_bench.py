"""trap2 bench: every (mode, target) cell runs the demo's evaluation, the summary agrees with the cell
reports, finished cells are reused, changed settings are redone, and an interrupted training run resumes
to the same update."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import trap2.pipeline
from trap2.bench import BenchConfig, _cell_key, run_bench
from trap2.cli import app
from trap2.config import ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError
from trap2.pipeline import DemoConfig, trained_update
from trap2.suites import Split

FAST = dict(steps=20, eval_every=20)


def small(**kw):
    base = dict(
        modes=("lora",),
        targets=("rot90", "flip"),
        lora=TrainConfig(**FAST),
        methods=("ta",),
        scales=(0.5, 1.0, 2.0),
        threats=None,
    )
    return BenchConfig(**{**base, **kw})


def test_bench_cells_summary_and_resume(tmp_path, monkeypatch):
    summary = run_bench(small(), tmp_path)
    assert [c["target"] for c in summary["cells"]] == ["rot90", "flip"]
    for cell in summary["cells"]:
        report = json.loads((tmp_path / "lora" / cell["target"] / "report.json").read_text())
        assert cell["protected"] == report["standalone"]["protected"][cell["target"]]
        assert cell["fine_tuned"] == report["standalone"]["unprotected"]
        assert cell["acc_s2"] == report["scaling_curve"]["protected"][2]
        ta = {a["protected"]: a["acc"] for a in report["attacks"]}
        for protected, side in ((False, "unprotected"), (True, "protected")):
            want = {"mean": ta[protected]["mean"], "target": ta[protected][cell["target"]]}
            assert cell["merges"]["ta"][side] == want
    # the plain pool is shared: 8 plain updates + 2 protected, nothing trained twice
    assert len([p for p in (tmp_path / "updates").iterdir() if p.is_dir()]) == 10
    # and so are its attack cells: one TA record for the unprotected pool, one per protected pool
    assert len(list((tmp_path / "lora" / "cells").glob("attack-*.json"))) == 3
    reports = [json.loads((tmp_path / "lora" / t / "report.json").read_text()) for t in ("rot90", "flip")]
    plain = [next(a for a in r["attacks"] if not a["protected"]) for r in reports]
    assert (
        plain[0] == plain[1]
        and plain[0]["acc"]["mean"] == summary["cells"][1]["merges"]["ta"]["unprotected"]["mean"]
    )
    md = (tmp_path / "bench.md").read_text()
    assert "| rot90 |" in md and "| flip |" in md and "## lora" in md

    def no_training(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(trap2.pipeline, "train_update", no_training)
    monkeypatch.setattr("trap2.bench.evaluate_protection", no_training)
    again = run_bench(small(), tmp_path)
    assert again["cells"] == summary["cells"]

    monkeypatch.undo()
    changed = run_bench(small(targets=("rot90",), methods=("ta", "ties")), tmp_path)  # redone: new settings
    assert set(changed["cells"][0]["merges"]) == {"ta", "ties"}

    # the command line: the same settings from YAML and flags reuse the finished cell and print the table
    (tmp_path / "b.yaml").write_text("lora: {steps: 20, eval_every: 20}\nscales: [0.5, 1.0, 2.0]\n")
    args = [
        "bench",
        "--out",
        str(tmp_path),
        "--config",
        str(tmp_path / "b.yaml"),
        "--modes",
        "lora",
        "--threats",
        "none",
    ]
    result = CliRunner().invoke(app, [*args, "--targets", "rot90", "--methods", "ta,ties", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| rot90 |" in result.output
    assert json.loads((tmp_path / "bench.json").read_text())["cells"] == changed["cells"]

    # a smaller pool: the cached updates of three tasks, merged among themselves (a new cell, no training)
    monkeypatch.setattr(trap2.pipeline, "train_update", no_training)
    result = CliRunner().invoke(
        app, [*args, "--targets", "rot90", "--methods", "ta", "--tasks", "flip,rot90,parity"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lora" / "rot90" / "report.json").read_text())
    assert report["tasks"] == ["flip", "rot90", "parity"]
    assert all(set(a["acc"]) == {"flip", "rot90", "parity", "mean"} for a in report["attacks"])


def test_an_interrupted_training_run_resumes_to_the_same_update(tmp_path, digits):
    cfg = TrainConfig(steps=20, eval_every=5, checkpoint_every=10, objective=ObjectiveConfig(lam=0.1))

    class Interrupt(Exception):
        pass

    class StopAt15:
        def stage(self, _description, _total):
            import contextlib

            seen = [0]

            def advance(n=1):
                seen[0] += n
                if seen[0] >= 15:
                    raise Interrupt

            return contextlib.nullcontext(advance)

    with pytest.raises(Interrupt):
        trained_update(digits, "rot90", cfg, tmp_path / "a", reporter=StopAt15())
    assert [p.name for p in (tmp_path / "a").iterdir()][0].endswith(".checkpoint")
    resumed = trained_update(digits, "rot90", cfg, tmp_path / "a")
    straight = trained_update(digits, "rot90", cfg, tmp_path / "b")
    assert not any(p.name.endswith(".checkpoint") for p in (tmp_path / "a").iterdir())
    for name, d in straight.dense().items():
        torch.testing.assert_close(resumed.dense()[name], d, rtol=0, atol=0)


def test_bench_config_recipes_and_errors(digits):
    assert BenchConfig().train_config(digits, "full") == TrainConfig(mode="full")
    # LoRA: the log law, the cap and collateral over the defaults (results/digits-bench-recipe.json)
    lora = BenchConfig().train_config(digits, "lora")
    want = ObjectiveConfig(lam=0.3, law="log", bound=10.0, collateral=1.0)
    assert lora == TrainConfig(mode="lora", objective=want)
    assert lora.run_steps == lora.plain().run_steps == 600
    custom = dataclasses.replace(digits, recipes={"full": {"lr": 3e-4, "objective": {"lam": 0.2}}})
    cfg = BenchConfig().train_config(custom, "full")
    assert (
        cfg.lr == 3e-4 and cfg.objective.lam == 0.2 and cfg.objective.name == "trap2" and cfg.mode == "full"
    )
    assert BenchConfig(targets=("all",)).target_list(digits) == digits.task_names
    assert BenchConfig().target_list(digits) == [digits.default_target]
    with pytest.raises(ConfigError, match="modes"):
        BenchConfig(modes=("qlora",))
    with pytest.raises(ConfigError, match="mode='full'"):
        BenchConfig(lora=TrainConfig(mode="full"))
    with pytest.raises(ConfigError, match="protecting objective"):
        BenchConfig(full=TrainConfig(mode="full", objective=ObjectiveConfig(name="none")))
    with pytest.raises(Exception, match="unknown task"):
        BenchConfig(targets=("rot91",)).target_list(digits)


def test_a_task_subset_is_the_pool_and_cells_are_keyed_by_their_pool(digits):
    small = digits.subset(["flip", "parity", "rot90"])
    assert small.task_names == ["flip", "parity", "rot90"] and small.default_target == "rot90"
    assert small.task("flip") is digits.task("flip") and digits.subset([]) is digits
    assert digits.subset(["flip", "parity"]).default_target == "flip"  # rot90 left out: the first
    assert BenchConfig(targets=("all",)).target_list(small) == ["flip", "parity", "rot90"]
    with pytest.raises(Exception, match="unknown task 'rot91'"):
        digits.subset(["flip", "rot91"])
    with pytest.raises(Exception, match="twice"):
        digits.subset(["flip", "flip"])
    with pytest.raises(Exception, match="at least two"):
        digits.subset(["flip"])
    with pytest.raises(ConfigError, match="not among tasks"):
        DemoConfig(target="rot90", tasks=("flip", "parity"))
    # a finished cell is keyed by its pool: a suite that gains a task redoes it
    demo = BenchConfig().demo_config(digits, "lora", "rot90")
    grown = dataclasses.replace(digits, tasks={**digits.tasks, "extra": digits.task("flip")})
    assert _cell_key(grown, demo) != _cell_key(digits, demo)
    sub = BenchConfig(tasks=("flip", "rot90")).demo_config(digits, "lora", "rot90")
    assert sub.tasks == ("flip", "rot90") and _cell_key(small, sub) != _cell_key(digits, demo)
    # ... and by the tasks' data, every split: a regenerated dataset redoes it (its report scores test)
    flip = digits.task("flip")
    for split in ("train", "val", "test"):
        old = flip.split(split)
        relabelled = dataclasses.replace(flip, **{split: Split(old.x, old.y.roll(1))})
        changed = dataclasses.replace(digits, tasks={**digits.tasks, "flip": relabelled})
        assert _cell_key(changed, demo) != _cell_key(digits, demo), split
    assert _cell_key(dataclasses.replace(digits, tasks=dict(digits.tasks)), demo) == _cell_key(digits, demo)


def test_bench_tables_show_the_merged_mean_and_the_protected_tasks_own_accuracy():
    from trap2.bench import bench_mode_tables

    cell = {
        "mode": "lora",
        "target": "add",
        "zero_shot": {"add": 0.0, "mean": 0.1},
        "fine_tuned": {"add": 0.9, "mean": 0.8},
        "protected": 0.88,
        "acc_s0.5": 0.0,
        "acc_s2": 0.01,
        "merges": {
            "ta": {"unprotected": {"mean": 0.3, "target": 0.675}, "protected": {"mean": 0.05, "target": 0.0}},
            "ties": {"unprotected": {"mean": 0.28, "target": 0.61}},  # its protected cell not finished
        },
    }
    tables = bench_mode_tables({"config": {"modes": ["lora", "full"]}, "cells": [cell]})
    assert set(tables) == {"lora", "lora-target"}
    assert (
        tables["lora"].splitlines()[-1] == "| add | 0.0 | 90.0 | 88.0 | 0.0 | 1.0 | 30.0 → 5.0 | 28.0 → – |"
    )
    assert tables["lora-target"].splitlines() == [
        "| protected task | zero-shot | ta | ties |",
        "|---|---|---|---|",
        "| add | 0.0 | 67.5 → 0.0 | 61.0 → – |",
    ]
    # the equal-steps reference: a column, and the mean gap (a gap that rounds to zero reads +0.0)
    from trap2.bench import bench_markdown

    ref = {**cell, "plain_equal_steps": {"steps": 40, "acc": 0.8802, "same_as_pool": False}}
    summary = {"suite": "s", "config": {"modes": ["lora"]}, "cells": [ref]}
    assert (
        bench_mode_tables(summary)["lora"]
        .splitlines()[-1]
        .startswith("| add | 0.0 | 90.0 | 88.0 | 88.0 (40) |")
    )
    assert "mean of 1 target(s): +0.0 pp" in bench_markdown(summary)


def test_equal_steps_reference_is_the_plain_update_trained_for_the_protected_steps(tmp_path, monkeypatch):
    from trap2.eval.evaluate import accuracy
    from trap2.suites import get_suite

    lora = TrainConfig(steps=10, protect_steps=20, eval_every=20)
    cfg = small(targets=("rot90",), tasks=("rot90", "flip"), lora=lora, equal_steps=True)
    summary = run_bench(cfg, tmp_path)
    ref = summary["cells"][0]["plain_equal_steps"]
    assert ref["steps"] == 20 and ref["same_as_pool"] is False
    # an independent reference: the 20-step plain update, folded into the backbone's own weights
    suite = get_suite("digits").subset(["rot90", "flip"])
    update = trained_update(suite, "rot90", dataclasses.replace(lora.plain(), steps=20), tmp_path / "updates")
    backbone = suite.make_backbone()
    state = backbone.state_dict()
    backbone.load_state_dict(
        {n: t + update.dense()[n] if n in update.dense() else t for n, t in state.items()}
    )
    assert ref["acc"] == accuracy(backbone, suite.task("rot90"), "test")
    # 2 plain pool members (10 steps), the protected update, the 20-step reference
    assert len([p for p in (tmp_path / "updates").iterdir() if p.is_dir()]) == 4
    md = (tmp_path / "bench.md").read_text()
    assert "plain, equal steps" in md and f"({ref['steps']})" in md
    gap = summary["cells"][0]["protected"] - ref["acc"]
    assert f"{round(100 * gap, 1) + 0.0:+.1f} pp" in md

    # run again: the finished cell and the reference are reused, nothing trained or evaluated
    def no_training(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(trap2.pipeline, "train_update", no_training)
    monkeypatch.setattr("trap2.bench.accuracy", no_training)
    assert run_bench(cfg, tmp_path)["cells"] == summary["cells"]
    # ... and so does the command line, the reference asked for with --equal-steps
    (tmp_path / "b.yaml").write_text(
        "lora: {steps: 10, protect_steps: 20, eval_every: 20}\nscales: [0.5, 1.0, 2.0]\n"
    )
    args = ["bench", "--out", str(tmp_path), "--config", str(tmp_path / "b.yaml"), "--modes", "lora"]
    args += ["--targets", "rot90", "--tasks", "rot90,flip", "--methods", "ta", "--threats", "none"]
    result = CliRunner().invoke(app, [*args, "--equal-steps", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bench.json").read_text())["cells"] == summary["cells"]

    # a recipe with equal steps already: the pool's own member is the reference
    monkeypatch.undo()
    same = run_bench(small(targets=("rot90",), tasks=("rot90", "flip"), equal_steps=True), tmp_path)
    cell = same["cells"][0]
    assert cell["plain_equal_steps"] == {
        "steps": 20,
        "acc": cell["fine_tuned"]["rot90"],
        "same_as_pool": True,
    }
