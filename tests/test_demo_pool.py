"""The demo's shipped pool (``scripts/make_pool.py``) and its worker processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.demo import POOL_ASSETS, run_demo, shipped_pool
from trap2.eval.evaluate import accuracy, base_state
from trap2.pipeline import DemoConfig, update_cache_key
from trap2.suites import Split, get_suite
from trap2.updates import LowRank, apply_delta


def test_shipped_pool_is_small_and_used_only_for_the_config_it_was_trained_with():
    from trap2.cli import _demo_config

    suite = get_suite("digits")
    plain = DemoConfig().train.plain()
    assert _demo_config(None).train.plain() == plain  # the README's `trap2 demo --out runs/demo`
    files = [p for p in (POOL_ASSETS / "digits").rglob("*") if p.is_file()]
    assert 0 < sum(p.stat().st_size for p in files) < 400_000
    pool = shipped_pool(suite, "rot90", plain)
    assert sorted(pool) == sorted(t for t in suite.task_names if t != "rot90")
    for t, u in pool.items():
        assert u.meta["cache_key"] == update_cache_key(suite, t, plain) and u.meta["task"] == t
        assert all(
            isinstance(d, LowRank) and d.A.dtype == d.B.dtype == torch.float32 for d in u.deltas.values()
        )
    assert "flip" not in shipped_pool(suite, "flip", plain)  # the target is always trained
    assert shipped_pool(suite, "rot90", dataclasses.replace(plain, steps=plain.steps - 1)) == {}
    assert shipped_pool(suite, "rot90", dataclasses.replace(plain, seed=plain.seed + 1)) == {}
    # a task whose training data changed trains its own update; the others are still shipped
    flip = suite.task("flip")
    x = flip.train.x.clone()
    x[0, 0, 0] = 1.0 - x[0, 0, 0]  # one pixel of one training image
    edited = dataclasses.replace(flip, train=Split(x, flip.train.y))
    changed = shipped_pool(dataclasses.replace(suite, tasks={**suite.tasks, "flip": edited}), "rot90", plain)
    assert sorted(changed) == sorted(t for t in pool if t != "flip")
    # each is the trained update: float16 storage keeps its recorded validation accuracy (float32, at
    # training time) within 1 pp, and fine-tuning shows where zero-shot is weak
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    gains = {}
    for t in ("flip", "invert", "shuffle"):
        zero = accuracy(backbone, suite.task(t), "val")
        tuned = accuracy(backbone, suite.task(t), "val", apply_delta(w0, pool[t].dense()))
        assert abs(tuned - pool[t].meta["val_acc"]) <= 0.01, (t, tuned, pool[t].meta["val_acc"])
        gains[t] = tuned - zero
    assert max(gains.values()) > 0.1, gains


@pytest.mark.slow
def test_demo_on_two_worker_processes_gives_the_same_report(tmp_path):
    cfg = DemoConfig(
        tasks=("rot90", "flip", "invert"),
        train=TrainConfig(steps=20, objective=ObjectiveConfig(name="trap2")),
        methods=("ta", "ties"),
        spaces=("full",),
        extra_searches=("pinned",),
        scales=(0.5, 1.0, 2.0),
    )
    one = run_demo(cfg, tmp_path / "one", workers=1)
    two = run_demo(cfg, tmp_path / "two", workers=2)
    assert two["workers"] == 2 and two["pool"] == {t: "trained" for t in cfg.tasks}
    assert any("2 processes" in s["stage"] for s in two["stages"])
    for key in ("zero_shot", "standalone", "scaling_curve"):
        assert one[key] == two[key], key
    strip = [{k: v for k, v in a.items() if k != "evaluations"} for a in one["attacks"]]
    assert strip == [{k: v for k, v in a.items() if k != "evaluations"} for a in two["attacks"]]
