"""benchmarks/step_time.py --part recipes in a tiny run: the rows are the suite's bench recipes and the
compute columns follow from the timed steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_recipes_part_times_each_bench_recipe_and_states_its_total_compute(tmp_path):
    from trap2.bench import BenchConfig
    from trap2.config import to_dict
    from trap2.suites import get_suite

    script = Path(__file__).parents[1] / "benchmarks" / "step_time.py"
    out = tmp_path / "recipes.json"
    args = ["--part", "recipes", "--recipe-suites", "digits", "--steps", "1", "--rounds", "1", "--out", out]
    done = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["kind"] == "step-time-recipes" and {"command", "threads", "machine", "wall_seconds"} <= set(r)
    suite = get_suite("digits")
    assert [(row["suite"], row["mode"]) for row in r["rows"]] == [("digits", "lora"), ("digits", "full")]
    for row in r["rows"]:
        cfg = BenchConfig(suite="digits").train_config(suite, row["mode"])
        assert row["objective"] == to_dict(cfg.objective)  # the recipe's own objective, not the defaults
        assert (row["batch"], row["plain_steps"], row["protect_steps"]) == (
            cfg.batch_size,
            cfg.steps,
            cfg.run_steps,
        )
        sec = row["step_seconds"]
        assert row["step_ratio"] == pytest.approx(sec["protected"] / sec["plain"])
        assert row["protected_compute"] == pytest.approx(cfg.run_steps * row["step_ratio"])
        assert row["vs_plain_recipe"] == pytest.approx(row["protected_compute"] / cfg.steps)
    assert r["rows"][0]["objective"]["collateral"] > 0  # digits' LoRA recipe: a three-pass step
    assert "| digits lora |" in done.stdout
