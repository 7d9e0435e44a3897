"""Custom suites: docs/custom_suite.md's example runs as written (built through `module:function`, trained
and audited from the CLI, protection visible in the scaling curve), the `trap2.suites` entry-point group
is consulted, and make_suite refuses suites that break the invariants."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from file_helpers import run_cli

from trap2.errors import ConfigError, UnknownNameError
from trap2.suites import Split, get_suite, make_suite, plugin_suites
from trap2.suites.base import CosineHead
from trap2.updates import load_update, tensors_fingerprint

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_suite.md"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The doc's Python example saved as my_suite.py on sys.path, as the doc says."""
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "my_suite.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_suite", None)


def test_the_documented_example_builds_a_checked_suite(example):
    suite = get_suite("my_suite:build")
    assert suite.name == "quadrants" and suite.task_names == ["plane0", "plane1", "plane2"]
    assert suite.fingerprint == tensors_fingerprint(dict(suite.make_backbone().named_parameters()))
    assert get_suite("my_suite:build") is suite  # built once per process


def test_the_documented_commands_train_and_audit(example, monkeypatch, capsys, tmp_path):
    # the doc's commands, with fewer steps and a smaller attack
    u = tmp_path / "quadrants-plane1"
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--suite", "my_suite:build", "--task", "plane1", "--steps", "600",
        "--lr", "0.01", "--lam", "0.5", "--bound", "5", "--out", str(u), "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    meta = load_update(u).meta
    assert meta["task"] == "plane1" and meta["base_fingerprint"] == get_suite("my_suite:build").fingerprint
    code, out, err = run_cli(
        monkeypatch, capsys, "audit", str(u), "--suite", "my_suite:build", "--steps", "300",
        "--methods", "ta", "--spaces", "full", "--out", str(tmp_path / "audit"), "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    curve = report["scaling_curve"]
    at = {s: i for i, s in enumerate(curve["s"])}
    prot, plain = curve["protected"], curve["unprotected"]
    # protected: works at s = 1 and breaks off it; the plain update of the same task does not
    assert prot[at[1.0]] > 0.9 and min(plain[at[0.5]], plain[at[1.0]], plain[at[2.0]]) > 0.9, curve
    assert max(prot[at[0.5]], prot[at[2.0]]) < 0.7, curve


def test_entry_point_group_is_consulted(example, tmp_path, monkeypatch):
    dist = tmp_path / "my_suite_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-suite-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trap2.suites]\nquadrants-plugin = my_suite:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugin_suites()["quadrants-plugin"] == "my_suite:build"
    assert get_suite("quadrants-plugin").task_names == ["plane0", "plane1", "plane2"]
    with pytest.raises(UnknownNameError, match="unknown suite 'nope'; valid: .*quadrants-plugin"):
        get_suite("nope")


def test_module_function_errors(example):
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        get_suite("no_such_module:build")
    with pytest.raises(ConfigError, match="'my_suite' has no function 'nope'"):
        get_suite("my_suite:nope")
    with pytest.raises(ConfigError, match="returned Encoder, not a Suite"):
        get_suite("my_suite:make_backbone")


def test_make_suite_refuses_broken_invariants(example):
    import my_suite

    good = get_suite("my_suite:build")
    task = good.task("plane0")
    kw = dict(lora_targets=("fc1",))

    def with_task(**change):
        return make_suite("x", [dataclasses.replace(task, **change)], my_suite.make_backbone, **kw)

    with pytest.raises(ConfigError, match="task 'plane0', split train: inputs and labels must each be one"):
        with_task(train=Split((task.train.x, task.train.x), task.train.y))
    with pytest.raises(ConfigError, match="split val: labels must be in \\[0, 4\\), got 1…7"):
        with_task(val=Split(task.val.x, task.val.y * 2 + 1))
    with pytest.raises(ConfigError, match="split test: labels must be int64"):
        with_task(test=Split(task.test.x, task.test.y.float()))
    with pytest.raises(ConfigError, match="split train: 512 inputs but 511 labels"):
        with_task(train=Split(task.train.x, task.train.y[:-1]))
    with pytest.raises(ConfigError, match="has shape \\(2, 3\\) for 2 inputs, expected \\(2, 4\\)"):
        with_task(head=CosineHead(torch.randn(3, 32), 10.0))
    with pytest.raises(ConfigError, match="LoRA target 'attn' is not a module"):
        make_suite("x", [task], my_suite.make_backbone, lora_targets=("attn",))
    with pytest.raises(ConfigError, match="default target 'plane9' is not a task"):
        make_suite("x", [task], my_suite.make_backbone, default_target="plane9", **kw)
    with pytest.raises(ConfigError, match="two tasks share a name"):
        make_suite("x", [task, task], my_suite.make_backbone, **kw)
