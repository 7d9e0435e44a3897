"""The attacker grid: its points and presets, the summary statistics on a hand-computed grid (worst
case, median, head start, smallest budget), a run on a tiny suite checked against zero-step identities,
the rendering, and the --threats switch of demo / audit / bench."""

import pytest
from file_helpers import run_cli
from threat_suite import threat_suite

from trap2.attacks import EvalContext, run_attack
from trap2.attacks.grid import GRIDS, AttackGrid, get_grid, run_grid, summarise
from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy
from trap2.eval.threats import grid_lines


def pt(samples, steps, lr=1e-3, mode="lora"):
    return {"lr": lr, "steps": steps, "samples": samples, "mode": mode, "optimiser": "adamw", "seed": 0}


# four points by hand: merged (mean, target "a") and the same attack from W0
HAND = [
    {"point": pt(10, 10), "merged": {"a": 0.30, "b": 0.50, "mean": 0.40}, "from_w0": {"mean": 0.20, "target": 0.10}},
    {"point": pt(10, 100), "merged": {"a": 0.70, "b": 0.70, "mean": 0.70}, "from_w0": {"mean": 0.60, "target": 0.50}},
    {"point": pt(100, 10), "merged": {"a": 0.80, "b": 0.84, "mean": 0.82}, "from_w0": {"mean": 0.75, "target": 0.90}},
    {"point": pt(100, 100, mode="full"), "merged": {"a": 0.60, "b": 0.60, "mean": 0.60},
     "from_w0": {"mean": 0.65, "target": 0.70}},
]  # fmt: skip


def test_summary_of_a_hand_computed_grid():
    s = summarise(HAND, "mean", "a", unprotected_mean=0.75)  # 90 %: 0.675
    assert s["points"] == 4
    assert s["worst"] == 0.82 and s["worst_target"] == 0.80 and s["worst_point"] == pt(100, 10)
    assert s["median"] == pytest.approx((0.60 + 0.70) / 2)
    assert s["head_start"] == pytest.approx(0.82 - 0.75) and s["from_w0_at_worst"] == 0.75
    # reached by (10, 100) at 0.70 and (100, 10) at 0.82: the fewest samples first, then the fewest steps
    assert s["threshold"] == pytest.approx(0.675)
    assert s["min_budget"]["samples"] == 10 and s["min_budget"]["steps"] == 100
    assert s["min_budget"]["mean"] == 0.70

    t = summarise(HAND, "target", "a", unprotected_mean=0.75)  # untrap / distill: the target from W0
    assert t["head_start"] == pytest.approx(0.80 - 0.90) and t["head_start_metric"] == "target"
    assert summarise(HAND, "mean", "a", unprotected_mean=1.0)["min_budget"] is None  # 0.9 never reached


def test_summary_takes_the_budget_with_fewest_samples_even_at_more_steps():
    rows = [
        {"point": pt(100, 10), "merged": {"a": 0.9, "mean": 0.9}, "from_w0": {"mean": 0.0}},
        {"point": pt(10, 1000), "merged": {"a": 0.9, "mean": 0.95}, "from_w0": {"mean": 0.0}},
    ]
    s = summarise(rows, "mean", "a", unprotected_mean=0.9)
    assert (s["min_budget"]["samples"], s["min_budget"]["steps"]) == (10, 1000)
    with pytest.raises(ConfigError, match="no points"):
        summarise([], "mean", "a", 0.5)


def test_grid_points_and_presets():
    full = get_grid("full")
    assert len(full.points()) == 3 * 3 * 3 * 2 * 2
    assert {p.lr for p in full.points()} == {1e-5, 1e-4, 1e-3} and {p.samples for p in full.points()} == {
        10,
        100,
        1000,
    }
    assert len(GRIDS["quick"].points()) == 8 and set(GRIDS["quick"].attacks) == {
        "recover",
        "untrap",
        "distill",
    }
    g = AttackGrid(lrs=[1e-3], steps=[5], samples=[10], modes=["full"], optimisers=["sgd"], seeds=[0, 1])
    assert [(p.optimiser, p.seed) for p in g.points()] == [("sgd", 0), ("sgd", 1)]
    with pytest.raises(ConfigError, match="empty"):
        AttackGrid(lrs=())
    with pytest.raises(ConfigError, match="attack"):
        AttackGrid(attacks=("steal",))
    with pytest.raises(ConfigError, match="mode"):
        AttackGrid(modes=("qlora",))
    with pytest.raises(ConfigError, match="not one of"):
        get_grid("huge")


@pytest.fixture(scope="module")
def tiny():
    suite, updates = threat_suite()
    ctx = EvalContext.normalised_by(suite, updates)
    pool = [updates[t] for t in suite.task_names]
    half = {
        "t0": updates["t0"].__class__({n: 0.3 * d for n, d in updates["t0"].deltas.items()}, {"task": "t0"})
    }
    protected = [half["t0"], *pool[1:]]  # a weakened "release" standing in for the protected member
    return suite, ctx, {False: pool, True: protected}


def test_grid_at_zero_steps_reproduces_the_merges_and_w0(tiny):
    suite, ctx, pools = tiny
    grid = AttackGrid(lrs=(1e-2,), steps=(0,), samples=(10,), modes=("full",), optimisers=("adamw",))
    out = run_grid(ctx, pools, 0, grid, "zero")
    ta = {p: run_attack(ctx, pool, "ta", "full", "global")["acc"] for p, pool in pools.items()}
    assert out["reference"]["unprotected_ta"]["mean"] == ta[False]["mean"]
    assert out["reference"]["trap2_ta"]["target"] == ta[True]["t0"]
    rec, untrap = out["attacks"]["recover"]["points"][0], out["attacks"]["untrap"]["points"][0]
    assert rec["merged"] == ta[True]  # no recovery steps: the Trap² merge itself
    zero_shot = [accuracy(ctx.backbone, suite.task(t), "test") for t in suite.task_names]
    assert rec["from_w0"]["mean"] == pytest.approx(sum(zero_shot) / 3)  # W0 itself
    assert untrap["merged"] == ta[True] and untrap["from_w0"]["target"] == zero_shot[0]
    for name, a in out["attacks"].items():
        assert a["summary"] == summarise(a["points"], a["metric"], "t0", ta[False]["mean"]), name


def test_grid_attacks_beat_the_weakened_member_and_render(tiny):
    suite, ctx, pools = tiny
    grid = AttackGrid(
        lrs=(1e-2,), steps=(100,), samples=(100,), modes=("lora", "full"), optimisers=("adamw",)
    )
    out = run_grid(ctx, pools, 0, grid, "tiny")
    base = out["reference"]["trap2_ta"]["target"]
    for name in ("untrap", "distill"):
        assert out["attacks"][name]["summary"]["worst_target"] > base, name  # the member works again
    assert out["attacks"]["distill"]["summary"]["points"] == 2
    lines = grid_lines({"threats": out})
    assert lines[0].startswith("## Attacker grid (`tiny`)") and sum(ln.startswith("| ") for ln in lines) == 4


def test_threats_switch_of_demo_audit_and_bench(monkeypatch, capsys, tmp_path):
    from trap2.bench import BenchConfig
    from trap2.cli import _demo_config

    assert _demo_config(None, threats="quick").threats == "quick"
    assert _demo_config(None).threats is None  # the demo runs no grid unless asked
    assert BenchConfig().demo_config(threat_suite()[0], "lora", "t0").threats == "full"  # bench: whole grid
    assert BenchConfig(threats="none").threats is None and _demo_config(None, threats="none").threats is None
    for cmd in (["demo"], ["audit", str(tmp_path / "u")], ["bench"]):
        code, out, err = run_cli(monkeypatch, capsys, *cmd, "--out", tmp_path / "o", "--threats", "huge")
        assert code != 0 and "'huge' is not one of quick, full" in out + err, cmd
        assert not (tmp_path / "o").exists()  # refused before anything is trained or written
