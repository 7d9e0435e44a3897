from trap2.eval.report import recovery_gaps, threats_table


def _cell(method, search, protected, mean, target=0.5):
    return {
        "method": method,
        "space": "full",
        "search": search,
        "protected": protected,
        "acc": {"mean": mean, "rot90": target},
    }


def test_recovery_gap_is_the_share_of_the_distance_to_the_unprotected_merge():
    report = {
        "target": "rot90",
        "zero_shot": {"mean": 0.6},
        "attacks": [
            _cell("ta", "global", False, 0.80),
            _cell("ta", "global", True, 0.60),
            _cell("ta", "recover10", False, 0.82),
            {**_cell("ta", "recover10", True, 0.65), "from_w0": {"mean": 0.7}},
            _cell("ta", "recover100", True, 0.90),
            _cell("ties", "recover10", True, 0.7),  # no global cell to compare with: left out
        ],
    }
    gaps = {g["search"]: g for g in recovery_gaps(report)}
    assert set(gaps) == {"recover10", "recover100"}
    assert abs(gaps["recover10"]["closed"] - 0.25) < 1e-9  # (0.65 − 0.60) / (0.80 − 0.60)
    assert gaps["recover10"]["unprotected_recovered"] == 0.82
    assert abs(gaps["recover100"]["closed"] - 1.5) < 1e-9  # past the unprotected merge
    assert gaps["recover100"]["unprotected_recovered"] is None
    assert gaps["recover10"]["from_w0"] == 0.7 and gaps["recover100"]["from_w0"] is None
    md = "\n".join(threats_table(report))
    assert "ta recover10 | 82.0 (50.0) | 65.0 (50.0) |" in md
    assert (
        "ta, k = 10: 60.0 → 65.0 (unprotected merge 80.0, itself recovered to 82.0; W0 itself recovered "
        "to 70.0): closes 25 % of the gap." in md
    )


def _demo_report():
    attacks = []
    for method, space in (("ta", "full"), ("ties", "full"), ("ties", "knots")):
        for prot, mean in ((False, 0.8), (True, 0.55)):
            attacks.append(
                {**_cell(method, "global", prot, mean), "space": space, "coefficient": 0.3, "hparams": {}}
            )
    return {
        "kind": "demo",
        "suite": "digits",
        "target": "rot90",
        "tasks": ["rot90", "flip"],
        "zero_shot": {"rot90": 0.5, "flip": 0.7, "mean": 0.6},
        "standalone": {
            "unprotected": {"rot90": 0.95, "flip": 0.9, "mean": 0.925},
            "protected": {"rot90": 0.94},
        },
        "scaling_curve": {
            "s": [0.5, 1.0, 2.0],
            "unprotected": [0.9, 0.95, 0.8],
            "protected": [0.1, 0.94, 0.1],
        },
        "attacks": attacks,
        "wall_seconds": 1.0,
    }


def test_render_dispatches_on_kind_and_selects_one_table():
    import pytest

    from trap2.errors import ConfigError, DataError
    from trap2.eval.report import RENDERERS, render, render_tables

    rep = _demo_report()
    assert {"demo", "audit", "bench"} <= set(RENDERERS)
    tables = render_tables(rep)
    assert list(tables)[:5] == ["summary", "standalone", "curve", "merges", "matrix"]
    summary = render(rep, "summary")
    assert "| standalone `rot90` | 95.0 | 94.0 |" in summary
    assert "| TA: `rot90` / mean of 2 | 50.0 / 80.0 | 50.0 / 55.0 |" in summary
    assert "knots" not in summary  # the summary keeps full-space cells
    assert "| with Trap² | 55.0 | 55.0 / 55.0 |" in render(rep, "matrix")
    assert render(rep) == "\n\n".join(t.strip("\n") for t in tables.values()) + "\n"
    with pytest.raises(ConfigError, match="no table 'nope'"):
        render(rep, "nope")
    with pytest.raises(DataError, match="no renderer for result kind 'nothing'"):
        render({**rep, "kind": "nothing"})


def test_a_new_kind_is_one_decorator(tmp_path):
    from trap2.eval.report import RENDERERS, render_docs, renderer

    @renderer("test-kind")
    def _tables(result):
        return {"only": f"| x |\n|---|\n| {result['x']} |"}

    try:
        (tmp_path / "results").mkdir()
        (tmp_path / "results" / "a.json").write_text('{"kind": "test-kind", "x": 7}')
        doc = tmp_path / "README.md"
        doc.write_text("intro\n<!-- trap2-report results/a.json only -->\nold\n<!-- /trap2-report -->\nend\n")
        assert render_docs(tmp_path) == [doc]  # stale, not rewritten
        assert "old" in doc.read_text()
        assert render_docs(tmp_path, write=True) == [doc]
        assert doc.read_text() == (
            "intro\n<!-- trap2-report results/a.json only -->\n| x |\n|---|\n| 7 |\n<!-- /trap2-report -->\nend\n"
        )
        assert render_docs(tmp_path) == []
    finally:
        del RENDERERS["test-kind"]


def test_trap2_report_cli(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_demo_report()))
    run = [sys.executable, "-m", "trap2.cli", "report"]
    r = subprocess.run([*run, str(path), "--table", "summary"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("|  | unprotected | Trap² |")
    r = subprocess.run([*run, str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such result file" in r.stderr


def test_protect_result_renders_original_against_protected():
    from trap2.eval.report import render

    acc = {"t": 0.9, "u": 0.8, "mean": 0.85}
    result = {
        "kind": "protect",
        "target": "t",
        "zero_shot": {"t": 0.5, "u": 0.6, "mean": 0.55},
        "standalone": {"unprotected": {"t": 0.96}, "protected": {"t": 0.95}},
        "agreement_test": 0.981,
        "scaling_curve": {"s": [0.1, 0.5, 1.0, 2.0], "unprotected": [0.6, 0.9, 0.96, 0.8],
                          "protected": [0.1, 0.1, 0.95, 0.1]},
        "attacks": [
            {"method": "ta", "space": "full", "search": "global", "protected": False, "acc": acc},
            {"method": "ta", "space": "full", "search": "global", "protected": True,
             "acc": {"t": 0.1, "u": 0.5, "mean": 0.3}},
        ],
        "cost": {"steps": {"protect": 60}, "ratios": {"protect_over_plain": 0.25,
                                                       "plain_then_protect_over_plain": 1.25}},
    }  # fmt: skip
    rows = render(result, "summary").splitlines()
    assert "| top-1 agreement with the original (test) | 100.0 | 98.1 |" in rows
    assert "| acc(s) at s = 0.1 / 0.5 / 2 | 60.0 / 90.0 / 80.0 | 10.0 / 10.0 / 10.0 |" in rows
    assert "| TA: `t` / mean of 2 | 90.0 / 85.0 | 10.0 / 30.0 |" in rows
    assert rows[-1].endswith("| 1 | 0.250 (60 steps; plain then protect: 1.250) |")


def test_harden_result_renders_one_row_per_variant_and_the_unprotected_once():
    from trap2.eval.report import render

    def run(variant, protected_acc, train):
        return {
            "target": "t",
            "variant": variant,
            "train_seconds": train,
            "standalone": {"unprotected": 0.96, "protected": protected_acc},
            "scaling_curve": {
                "s": [0.5, 1.0, 2.0],
                "unprotected": [0.9, 0.96, 0.8],
                "protected": [0.1, 0.95, 0.2],
            },
            "attacks": [
                {"method": "ta", "search": "global", "protected": False, "target_acc": 0.7, "mean_acc": 0.83},
                {"method": "ta", "search": "global", "protected": True, "target_acc": 0.09, "mean_acc": 0.62},
                {"method": "ta", "search": "untrap", "protected": True, "target_acc": 0.1, "mean_acc": 0.65},
            ],
        }

    result = {
        "kind": "harden",
        "methods": ["ta"],
        "searches": ["untrap"],
        "runs": [run("paper", 0.95, 30.4), run("operators", 0.94, None)],
    }
    rows = render(result, "summary").splitlines()
    assert rows[0] == "| target | update | standalone | acc(0.5) / acc(2) | TA | TA untrap | train s |"
    assert rows[2:] == [
        "| `t` | unprotected | 96.0 | 90.0 / 80.0 | 83.0 (70.0) | – | – |",
        "| `t` | paper | 95.0 | 10.0 / 20.0 | 62.0 (9.0) | 65.0 (10.0) | 30 |",
        "| `t` | operators | 94.0 | 10.0 / 20.0 | 62.0 (9.0) | 65.0 (10.0) | – |",
    ]


def test_lm_results_render_their_tables():
    from trap2.eval.report import render_tables

    tasks = {
        "kind": "lm-tasks",
        "tasks": ["add", "sort"],
        "zero_shot": {"add": 0.0, "sort": 0.05},
        "fine_tuned": {"add": 0.9, "sort": 0.6},
        "cross": {"add": {"add": 0.9, "sort": 0.1}, "sort": {"add": 0.2, "sort": 0.6}},
    }
    table = render_tables(tasks)["tasks"]
    assert "| `add` | 0.0 | 90.0 | +90.0 | 20.0 (`sort`) |" in table
    assert "| `sort` | 5.0 | 60.0 | +55.0 | 10.0 (`add`) |" in table
    merged = render_tables({**tasks, "ta_merge": {"c": 0.4, "test": {"add": 0.5, "sort": 0.2}}})["tasks"]
    assert "| `add` | 0.0 | 90.0 | +90.0 | 20.0 (`sort`) | 50.0 |" in merged
    assert merged.splitlines()[-1] == "| mean | 2.5 | 75.0 |  |  | 35.0 |" and "TA merge (c = 0.4)" in merged
    cell = {"target": "add", "method": "ties", "knob": "lambda", "c": 0.5}
    merges = {
        "kind": "mergekit-cli",
        "cells": [
            {**cell, "protected": False, "acc": {"add": 0.8, "mean": 0.5}},
            {**cell, "protected": True, "acc": {"add": 0.1, "mean": 0.3}},
        ],
    }
    assert (
        "| `add` | `ties` | 80.0 / 50.0 (lambda 0.5) | 10.0 / 30.0 (lambda 0.5) |"
        in render_tables(merges)["merges"]
    )
    lam = {"kind": "lm-lambda", "scales": [0.5, 1.0], "rows": [{"lam": None, "curve": [0.8, 0.9]},
                                                                 {"lam": 0.1, "curve": [0.0, 0.88]}]}  # fmt: skip
    assert render_tables(lam)["curves"].splitlines()[-1] == "| Trap² λ=0.1 | 0.0 | 88.0 |"
    # rows of `--variants` carry their own label (the spec), shown instead of λ
    lam["rows"].append({"lam": 0.1, "label": "Trap² lam=0.1,law=log", "curve": [0.0, 0.9]})
    assert render_tables(lam)["curves"].splitlines()[-1] == "| Trap² lam=0.1,law=log | 0.0 | 90.0 |"


def test_protect_sweep_renderer_shows_the_named_rows():
    from trap2.eval.report import RENDERERS

    rows = [
        {"spec_str": "a", "agreement_test": 0.99, "acc_protected": 0.95, "curve": [0.9, 0.1, 0.2], "cost_vs_plain600": 0.25},
        {"spec_str": "b", "agreement_test": 0.5, "acc_protected": 0.5, "curve": [0.9, 0.3, 0.4]},
    ]  # fmt: skip
    result = {"kind": "protect-sweep", "curve_s": [0.0, 0.5, 2.0], "rows": rows, "shown": ["a"]}
    table = RENDERERS["protect-sweep"](result)["rows"].splitlines()
    assert table[0] == "| setting | agreement | standalone | acc(s) at 0.5 / 2 | cost |"
    assert table[2:] == ["| `a` | 99.0 | 95.0 | 10.0 / 20.0 | 0.25× |"]
    del result["shown"]
    assert (
        RENDERERS["protect-sweep"](result)["rows"].splitlines()[3]
        == "| `b` | 50.0 | 50.0 | 30.0 / 40.0 | – |"
    )


def test_step_time_extensions_renders_ms_and_the_ratio_to_plain():
    from trap2.eval.report import render

    result = {
        "kind": "step-time-extensions",
        "plain": "none",
        "variants": [{"variant": "none"}, {"variant": "trap2"}, {"variant": "n_samples=2"}],
        "modes": {
            "lora": {"step_seconds": {"none": 0.010, "trap2": 0.025, "n_samples=2": 0.0351}},
            "full": {"step_seconds": {"none": 0.020, "trap2": 0.030}},  # n_samples=2 not timed here
        },
    }
    assert render(result).splitlines() == [
        "| variant | LoRA ms | LoRA × plain | full ms | full × plain |",
        "|---|---|---|---|---|",
        "| `none` | 10.0 | 1.00× | 20.0 | 1.00× |",
        "| `trap2` | 25.0 | 2.50× | 30.0 | 1.50× |",
        "| `n_samples=2` | 35.1 | 3.51× | – | – |",
    ]


def test_step_time_recipes_renders_the_ratio_and_the_total_compute():
    from trap2.eval.report import render

    row = {
        "suite": "text-transformer",
        "mode": "lora",
        "batch": 16,
        "objective": {"name": "trap2", "lam": 0.3, "law": "log", "collateral": 0.3, "bound": None},
        "plain_steps": 300,
        "protect_steps": 600,
        "step_seconds": {"plain": 0.2, "protected": 0.55},
        "step_ratio": 2.75,
        "protected_compute": 1650.0,
        "vs_plain_recipe": 5.5,
    }
    paper = {**row, "suite": "digits", "mode": "full", "objective": {"name": "trap2", "lam": 0.0},
             "protected_compute": 600.0, "vs_plain_recipe": 1.0}  # fmt: skip
    lines = render({"kind": "step-time-recipes", "rows": [row, paper]}).splitlines()
    assert lines[2] == (
        "| text-transformer lora | trap2 (lam 0.3, collateral 0.3, law log) | 16 | 200 | 550 | 2.75× "
        "| 300 / 600 | 1,650 | 5.5× |"
    )
    assert lines[3].startswith("| digits full | trap2 | 16 |")  # no knob set: the bare name


def test_scaling_curves_renders_one_row_per_update_with_its_protect_settings():
    from trap2.eval.report import RENDERERS

    rows = [
        {"update": "a", "objective": None, "protect": None, "curve": [0.5, 0.9]},
        {"update": "b", "objective": {"lam": 2.0}, "lr": 3e-3, "curve": [0.1, 0.8],
         "protect": {"steps": 60, "repair": 0.5, "temperature": 4.0, "agreement_test": 0.954}},
    ]  # fmt: skip
    table = RENDERERS["scaling-curves"]({"kind": "scaling-curves", "scales": [0.5, 1.0], "rows": rows})
    lines = table["curves"].splitlines()
    assert lines[0] == "| update | agreement | s=0.5 | s=1 |"
    assert lines[2] == "| original | – | 50.0 | 90.0 |"
    assert lines[3] == "| λ 2, lr 0.003, 60 steps, repair 0.5, T 4 | 95.4 | 10.0 | 80.0 |"
    rows[1]["lr"] = None  # the run's lr was the default, not recorded: '?', not a crash
    table = RENDERERS["scaling-curves"]({"kind": "scaling-curves", "scales": [0.5, 1.0], "rows": rows})
    assert table["curves"].splitlines()[3].startswith("| λ 2, lr ?, 60 steps, repair 0.5, T 4 |")


def test_scaling_curves_splits_table_tells_underfitting_from_a_generalisation_gap():
    from trap2.eval.report import RENDERERS

    rows = [
        {"update": "p", "objective": {"name": "none"}, "steps": 1200, "curve": [0.5, 0.61],
         "splits": {"train": 1.0, "val": 0.612, "test": 0.61}},
        {"update": "t", "objective": {"name": "trap2", "lam": 0.2, "bound": 3.0, "balance": None},
         "steps": 1200, "curve": [0.1, 0.554], "splits": {"train": 1.0, "val": 0.57, "test": 0.554}},
        {"update": "d", "objective": {"name": "trap2", "lam": 0.2, "delta": 0.2},
         "steps": 1200, "curve": [0.1, 0.589], "splits": {"train": 0.917, "val": 0.562, "test": 0.589}},
    ]  # fmt: skip
    tables = RENDERERS["scaling-curves"]({"kind": "scaling-curves", "scales": [0.5, 1.0], "rows": rows})
    assert tables["curves"].splitlines()[3] == "| trap2, λ 0.2, τ 3 | – | 10.0 | 55.4 |"
    lines = tables["splits"].splitlines()
    assert lines[0] == "| objective | steps | train | val | test |"
    assert lines[2] == "| plain | 1200 | 100.0 | 61.2 | 61.0 |"
    assert lines[3] == "| trap2, λ 0.2, τ 3 | 1200 | 100.0 | 57.0 | 55.4 |"
    assert lines[4] == "| trap2, λ 0.2, δ 0.2 | 1200 | 91.7 | 56.2 | 58.9 |"  # δ named off its default
    for r in rows:  # without --splits: no such table
        del r["splits"]
    assert "splits" not in RENDERERS["scaling-curves"](
        {"kind": "scaling-curves", "scales": [0.5, 1.0], "rows": rows}
    )


def test_objective_label_names_every_field_off_its_default():
    """Two objectives that differ in any ObjectiveConfig field never share a label: each field off its
    default is named (by its symbol where it has one); fields at their default or not recorded are not."""
    import dataclasses

    from trap2.config import ObjectiveConfig
    from trap2.eval.report import _objective_label

    full = dataclasses.asdict(ObjectiveConfig(name="trap2", lam=0.2))  # a result records every field
    assert _objective_label(full) == "trap2, λ 0.2"
    assert _objective_label({"name": "trap2", "lam": 0.2}) == "trap2, λ 0.2"  # an older, shorter record
    off = dict(
        full, law="log", collateral=0.3, operators="scale,spectral", lookahead_steps=2, weight="inv_sqrt"
    )
    assert _objective_label(off) == (
        "trap2, λ 0.2, w inv_sqrt, law log, μ 0.3, operators scale,spectral, lookahead_steps 2"
    )
    labels = set()
    for f in dataclasses.fields(ObjectiveConfig):  # each field changed alone gives a label of its own
        if f.name in ("name", "lam"):
            continue
        value = {"float": 0.37, "int": 3, "str": "x"}.get(type(full[f.name]).__name__, 0.37)
        labels.add(_objective_label(dict(full, **{f.name: value})))
    assert len(labels) == len(dataclasses.fields(ObjectiveConfig)) - 2
    assert _objective_label({"name": "none", "lam": 0.2}) == "plain"
