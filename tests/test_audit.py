"""trap2 audit: a released update against a pool (given updates + the suite's plain ones), reported
like the demo, with the heat map; and the errors for updates that do not fit the suite."""

import dataclasses
import json

import pytest

from trap2.audit import run_audit
from trap2.config import ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError, UpdateFileError
from trap2.eval.evaluate import accuracy, base_state
from trap2.pipeline import DemoConfig
from trap2.training import train_update
from trap2.updates import apply_delta, load_update

FAST = TrainConfig(steps=20, eval_every=20)


@pytest.fixture(scope="module")
def released(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("audit")
    prot = train_update(digits, "rot90", dataclasses.replace(FAST, objective=ObjectiveConfig(lam=0.1)))
    prot.update.save(root / "prot", peft_model=prot.peft_model)
    flip = train_update(
        digits, "flip", dataclasses.replace(FAST, objective=ObjectiveConfig(name="none"), seed=5)
    )
    flip.update.save(root / "flip", peft_model=flip.peft_model)
    return root


def test_audit_reports_the_released_update(released, digits, tmp_path):
    cfg = DemoConfig(train=FAST, methods=("ta",), spaces=("full",), extra_searches=(), scales=(0.5, 1.0, 2.0))
    report = run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip"])
    assert report["target"] == "rot90" and report["pool"]["flip"] == "given"
    assert sum(v == "trained" for v in report["pool"].values()) == 7
    assert report["audited_meta"]["objective"]["name"] == "trap2"
    backbone = digits.make_backbone()
    want = accuracy(
        backbone,
        digits.task("rot90"),
        "test",
        apply_delta(base_state(backbone), load_update(released / "prot").dense()),
    )
    assert report["standalone"]["protected"]["rot90"] == pytest.approx(want)
    assert report["scaling_curve"]["protected"][1] == pytest.approx(want)
    assert {(a["method"], a["protected"]) for a in report["attacks"]} == {("ta", False), ("ta", True)}
    for name in ("report.json", "report.md", "scaling_curve.png", "merge_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["audited"] == str(released / "prot")


def test_audit_refuses_updates_that_do_not_fit(released, tmp_path):
    cfg = DemoConfig(train=FAST, methods=("ta",), spaces=("full",), extra_searches=())
    with pytest.raises(ConfigError, match="two updates for task 'flip'"):
        run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip", released / "flip"])
    other = load_update(released / "prot")
    other.meta["base_fingerprint"] = "0" * 64
    other.save(tmp_path / "other")
    with pytest.raises(UpdateFileError, match="made for base 000000000000"):
        run_audit(tmp_path / "other", cfg, tmp_path / "r")
    anon = load_update(released / "prot")
    del anon.meta["task"]
    anon.save(tmp_path / "anon")
    with pytest.raises(ConfigError, match="pass --task"):
        run_audit(tmp_path / "anon", cfg, tmp_path / "r")
    with pytest.raises(Exception, match="unknown task"):
        run_audit(tmp_path / "anon", cfg, tmp_path / "r", task="nope")


# a three-task pool, task arithmetic only, no curve: the audit's cheapest full run
THREE_TASKS = DemoConfig(
    train=FAST,
    tasks=("rot90", "flip", "invert"),
    methods=("ta",),
    spaces=("full",),
    extra_searches=(),
    scales=(1.0,),
)


def test_audit_merges_the_pool_the_config_names(released, tmp_path):
    """``tasks`` in the audit's config is the pool (it was ignored: every task of the suite was trained)."""
    cfg = THREE_TASKS
    report = run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip"])
    assert report["tasks"] == ["rot90", "flip", "invert"]
    assert report["pool"] == {"rot90": "trained", "flip": "given", "invert": "trained"}
    assert all(set(a["acc"]) == {"rot90", "flip", "invert", "mean"} for a in report["attacks"])


def test_audit_run_again_resumes_from_its_finished_cells(released, tmp_path, monkeypatch):
    """The second run reads every attack cell from ``out/cells`` and writes the same report; ``fresh``
    recomputes them."""
    cfg = THREE_TASKS
    first = run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip"])
    assert len(list((tmp_path / "cells").glob("attack-*.json"))) == 2

    def killed(*_args, **_kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("trap2.attacks.merge_attack.run_attack", killed)
    again = run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip"])
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == {
        k: v for k, v in first.items() if k != "wall_seconds"
    }
    with pytest.raises(AssertionError, match="recomputed"):
        run_audit(released / "prot", cfg, tmp_path, pool=[released / "flip"], fresh=True)
