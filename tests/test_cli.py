import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.demo import run_demo
from trap2.errors import ConfigError
from trap2.pipeline import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "trap2.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--lam", "-1"], "lam must be >= 0"),
        (["--delta", "0.96"], "need delta < 1 - s_min"),
        (
            ["--objective", "trap3"],
            "unknown objective 'trap3'; valid: flatten, none, trap2, trap2_distill, trap2_split",
        ),
        (
            ["--suite", "cifar"],
            "unknown suite 'cifar'; valid: clip8, digits, lm, math, text-transformer, vision-cnn",
        ),
        (["--task", "rot45"], "unknown task 'rot45'"),
        (["--weight", "cube"], "inv, inv_sqrt, none"),
        (["--law", "normal"], "objective.law must be one of uniform, log"),
        (["--collateral", "-0.5"], "collateral must be >= 0"),
        (["--config", "missing.yaml"], "no such config file"),
    ],
)
def test_train_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    r = cli("train", "--out", str(tmp_path / "u"), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("args", [["no-such-command"], ["train", "--no-such-option"]])
def test_usage_errors_are_short_without_a_traceback(args):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "No such" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) < 15


def test_dora_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lora: {use_dora: true}\n")
    r = cli("train", "--out", str(tmp_path / "u"), "--config", str(tmp_path / "c.yaml"))
    assert r.returncode == 2 and "DoRA" in r.stderr and not (tmp_path / "u").exists()


def test_train_command_writes_a_peft_adapter(tmp_path):
    r = cli(
        "train",
        "--out",
        str(tmp_path / "u"),
        "--task",
        "flip",
        "--steps",
        "20",
        "--threads",
        "1",
        "--law",
        "log",
    )
    assert r.returncode == 0, r.stderr
    assert "test acc" in r.stdout
    from peft import PeftModel

    from trap2.suites.digits import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PeftModel.from_pretrained(load_backbone(), tmp_path / "u")
    assert model(torch.zeros(2, 8, 8)).shape == (2, 64)
    meta = json.loads((tmp_path / "u" / "trap2.json").read_text())
    assert meta["objective"]["name"] == "trap2" and meta["task"] == "flip"
    assert meta["objective"]["law"] == "log"


def test_listings():
    r = cli("methods", "--json")
    listing = json.loads(r.stdout)
    names = {m["name"] for m in listing["methods"]}
    registered = {"ta", "ties", "dare", "dare_ties", "tsv", "cart", "wudi", "iso_c", "iso_cts", "emr"}
    assert names == registered | {"regmean", "chain_of_merges"}  # the data-dependent ones too
    assert {m["name"] for m in listing["methods"] if m.get("data")} == {"regmean", "chain_of_merges"}
    wudi = next(m for m in listing["methods"] if m["name"] == "wudi")
    assert wudi["hparams"]["steps"]["default"] == 300 and "2503.08099" in wudi["reference"]
    assert listing["spaces"] == ["core", "full", "knots"]
    ties = next(m for m in listing["methods"] if m["name"] == "ties")
    assert ties["hparams"]["k"]["grid"][0] == 100 and "thresholds" not in ties["hparams"]
    assert "arXiv" in ties["reference"]
    listing = cli("objectives").stdout
    assert "trap2" in listing
    assert all(
        f"\n{name} " in listing for name in ("scale", "layer_scale", "trim", "drop", "spectral", "isotropic")
    )


def test_demo_report_schema_and_cache(tmp_path):
    cfg = DemoConfig(
        train=TrainConfig(steps=30, eval_every=30, warmup_steps=5),
        scales=(0.5, 1.0, 2.0),
        methods=("ta", "ties", "cart"),
        spaces=("full", "knots", "core"),
        extra_searches=("pinned",),
    )
    report = run_demo(cfg, tmp_path)
    assert set(report) >= {
        "suite",
        "target",
        "tasks",
        "seed",
        "zero_shot",
        "standalone",
        "scaling_curve",
        "attacks",
        "config",
        "wall_seconds",
    }
    tasks = report["tasks"]
    assert set(report["zero_shot"]) == {*tasks, "mean"}
    assert set(report["standalone"]["unprotected"]) == {*tasks, "mean"}
    assert list(report["standalone"]["protected"]) == [report["target"]]
    assert len(report["scaling_curve"]["protected"]) == 3
    cells = {(a["method"], a["space"], a["search"]) for a in report["attacks"]}
    assert cells == set(cfg.cells()) and len(report["attacks"]) == 2 * len(cells) == 16
    assert {("ties", "knots", "global"), ("cart", "core", "global"), ("ta", "full", "pinned")} <= cells
    for a in report["attacks"]:
        assert 0.1 <= a["coefficient"] <= 9.9 and len(a["coefficients"]) == 8
        assert all(0 <= v <= 1 for v in a["acc"].values())
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["attacks"] == report["attacks"]
    assert (tmp_path / "scaling_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| pool | ta | ties full | ties knots | ties core | cart full |" in md
    assert len(list((tmp_path / "updates").iterdir())) == 9
    # run again: every update comes from the cache, numbers are identical
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "updates").rglob("*.safetensors")}
    again = run_demo(dataclasses.replace(cfg, methods=("ta",), extra_searches=()), tmp_path)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert again["attacks"] == report["attacks"][:2] and again["scaling_curve"] == report["scaling_curve"]


def test_demo_config_errors():
    with pytest.raises(ConfigError, match="protecting objective"):
        DemoConfig(train=TrainConfig(objective=ObjectiveConfig(name="none")))
    with pytest.raises(Exception, match="unknown merge method"):
        DemoConfig(methods=("ta", "slerp"))


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_starts_with_the_two_commands_ci_uses():
    setup, tests = _readme_commands()[:2]
    assert "pip install" in setup and "trap2 demo --out runs/demo" in setup
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_demo_meets_the_promises(tmp_path):
    """The README's main job, as a newcomer runs it, and what its report must show (issue #2)."""
    setup = _readme_commands()[0]
    demo_args = setup.split("trap2 demo", 1)[1].split()
    demo_args[demo_args.index("--out") + 1] = str(tmp_path / "demo")
    r = cli("demo", *demo_args)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    t, zs = rep["target"], rep["zero_shot"]["mean"]
    plain, prot = rep["standalone"]["unprotected"][t], rep["standalone"]["protected"][t]
    curve = dict(zip(rep["scaling_curve"]["s"], rep["scaling_curve"]["protected"], strict=True))
    assert prot >= plain - 0.02
    assert curve[0.5] <= 0.5 * curve[1.0] and curve[2.0] <= 0.5 * curve[1.0]
    by_cell = {
        (a["method"], a["space"], a["search"], a["protected"]): a["acc"]["mean"] for a in rep["attacks"]
    }
    for method, space, search, protected in by_cell:
        if search != "global" or protected:
            continue
        cell = (method, space, search)
        assert by_cell[(*cell, True)] < by_cell[(*cell, False)], cell  # protection lowers every cell
        if method in ("ta", "ties"):  # issue #2's promise, in full space
            assert by_cell[(*cell, False)] > zs and by_cell[(*cell, True)] < zs, cell


def test_training_doc_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "training.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = code.replace("TrainConfig(objective=", "TrainConfig(steps=30, objective=")
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    delta = namespace["delta"]
    assert delta and all(torch.isfinite(d).all() for d in delta.values())
    assert (tmp_path / "runs" / "rot90" / "adapter_config.json").is_file()


def test_written_files_have_the_usual_mode(tmp_path):
    import os
    import stat

    from trap2.io import write_json

    write_json(tmp_path / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~mask


def test_objective_options_come_from_the_config_and_refuse_a_clash():
    """Every ObjectiveConfig field is an option of `train` and `demo`; a command option that would shadow
    one is an error when the command is defined, not a silently dropped knob."""
    from typing import Annotated

    import typer
    from typer.main import get_command

    from trap2.cli import app, objective_flags, objective_options

    flags = objective_flags()
    assert set(flags) == {f.name for f in dataclasses.fields(ObjectiveConfig)}
    for name in ("train", "demo"):
        opts = {o for p in get_command(app).commands[name].params for o in p.opts}
        assert set(flags.values()) <= opts, name
    with pytest.raises(TypeError, match="--lam is both an option and objective.lam"):

        @objective_options
        def clash(lam: Annotated[float, typer.Option("--lam")] = 0.0, objective: dict | None = None) -> None:
            pass
