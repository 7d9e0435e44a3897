"""trap2 audit / bench on a model folder and data files (--base, --task NAME=ADAPTER_DIR:DATA): parsing,
the pool taken from the given adapters, the options reaching the suite builder, and the refusals.

The suite builder (trap2.suites.files.files_suite, built separately) is replaced here by a fake that
returns digits tasks, so these tests check the command path only; end-to-end tests on real model
folders and data files live with the files suite."""

import dataclasses
import json

import pytest
from file_helpers import run_cli

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError, DataError, UpdateFileError
from trap2.eval.evaluate import accuracy, base_state
from trap2.files_job import parse_task, parse_tasks
from trap2.suites import files
from trap2.training import train_update
from trap2.updates import apply_delta, load_update

FAST = TrainConfig(steps=20, eval_every=20)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, digits):
    """A base folder, data files, a protected rot90 adapter and plain flip / rot90 adapters."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "model").mkdir()
    for name in ("rot90", "flip", "rot180"):
        (root / f"{name}.jsonl").write_text('{"text": "unused by the fake suite", "label": 0}\n')
    prot = train_update(digits, "rot90", dataclasses.replace(FAST, objective=ObjectiveConfig(lam=0.1)))
    prot.update.save(root / "prot", peft_model=prot.peft_model)
    for task, seed in (("flip", 5), ("rot90", 6)):
        cfg = dataclasses.replace(FAST, objective=ObjectiveConfig(name="none"), seed=seed)
        plain = train_update(digits, task, cfg)
        plain.update.save(root / f"plain-{task}", peft_model=plain.peft_model)
    (root / "run.yaml").write_text("extra_searches: []\nscales: [0.5, 1.0, 2.0]\n")
    return root


@pytest.fixture
def fake_files(monkeypatch, digits):
    """files_suite replaced by digits tasks named like the --task specs; records each call."""
    calls = []

    def files_suite(base, tasks, *, name=None, scoring="auto", seed=0, val_fraction=0.15,
                    test_fraction=0.15, max_len=128, batch_size=64, device="cpu"):  # fmt: skip
        calls.append({"base": base, "tasks": list(tasks), "scoring": scoring, "seed": seed,
                      "batch_size": batch_size, "device": device})  # fmt: skip
        for t in tasks:
            if not t.data.exists():
                raise DataError(f"{t.data}: missing")
        return dataclasses.replace(digits.subset([t.name for t in tasks]), name=name or "files")

    monkeypatch.setattr(files, "files_suite", files_suite)
    return calls


def test_task_specs_parse(zoo):
    t = parse_task(f"a={zoo / 'prot'}:{zoo / 'flip.jsonl'}")
    assert (t.name, t.adapter, t.data) == ("a", zoo / "prot", zoo / "flip.jsonl")
    assert parse_task(f"b=:{zoo / 'flip.jsonl'}").adapter is None
    with pytest.raises(ConfigError, match="NAME=ADAPTER_DIR:DATA"):
        parse_task(str(zoo / "flip.jsonl"))
    with pytest.raises(DataError, match="--task a: data .*nope.jsonl: no such file"):
        parse_task(f"a=:{zoo / 'nope.jsonl'}")
    with pytest.raises(UpdateFileError, match="--task a: adapter .*nope: no such"):
        parse_task(f"a={zoo / 'nope'}:{zoo / 'flip.jsonl'}")
    with pytest.raises(ConfigError, match="'a' is given twice"):
        parse_tasks([f"a=:{zoo / 'flip.jsonl'}"] * 2)
    with pytest.raises(ConfigError, match="at least two tasks"):
        parse_tasks([f"a=:{zoo / 'flip.jsonl'}"])


def test_audit_from_files_uses_the_given_adapters(zoo, digits, fake_files, monkeypatch, capsys, tmp_path):
    out = tmp_path / "audit"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "audit", "--base", str(zoo / "model"),
        "--task", f"rot90={zoo / 'prot'}:{zoo / 'rot90.jsonl'}",
        "--task", f"flip={zoo / 'plain-flip'}:{zoo / 'flip.jsonl'}",
        "--task", f"rot180=:{zoo / 'rot180.jsonl'}",
        "--protected", "rot90", "--scoring", "exact", "--seed", "3", "--batch-size", "16", "--device", "cpu",
        "--steps", "20", "--methods", "ta", "--spaces", "full", "--config", str(zoo / "run.yaml"),
        "--out", str(out), "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    (call,) = fake_files
    assert call["base"] == zoo / "model" and [t.name for t in call["tasks"]] == ["rot90", "flip", "rot180"]
    assert (call["scoring"], call["seed"], call["batch_size"], call["device"]) == ("exact", 3, 16, "cpu")
    report = json.loads((out / "report.json").read_text())
    # the audited adapter is the protected task's; its plain reference and the adapter-less task are trained
    assert report["audited"] == str(zoo / "prot") and report["target"] == "rot90"
    assert report["pool"] == {"rot90": "trained", "flip": "given", "rot180": "trained"}
    assert report["config"]["train"]["seed"] == 3 and report["config"]["train"]["steps"] == 20
    backbone = digits.make_backbone()
    w0 = base_state(backbone)

    def acc(task, folder):
        return accuracy(backbone, digits.task(task), "test", apply_delta(w0, load_update(folder).dense()))

    assert report["standalone"]["protected"]["rot90"] == pytest.approx(acc("rot90", zoo / "prot"))
    # the given adapter, not a retrained one
    assert report["standalone"]["unprotected"]["flip"] == pytest.approx(acc("flip", zoo / "plain-flip"))
    assert {a["method"] for a in report["attacks"]} == {"ta"} and (out / "report.md").is_file()
    assert "trap2 audit" in stdout


def test_audit_from_files_with_an_update_and_every_adapter_trains_nothing(
    zoo, fake_files, monkeypatch, capsys, tmp_path
):
    out = tmp_path / "audit"
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", str(zoo / "prot"), "--base", str(zoo / "model"),
        "--task", f"rot90={zoo / 'plain-rot90'}:{zoo / 'rot90.jsonl'}",
        "--task", f"flip={zoo / 'plain-flip'}:{zoo / 'flip.jsonl'}",
        "--methods", "ta", "--spaces", "full", "--config", str(zoo / "run.yaml"), "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "rot90"  # recorded in the audited update: no --protected needed
    assert report["pool"] == {"rot90": "given", "flip": "given"}
    assert not (out / "updates").exists()  # nothing trained


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"base_fingerprint": "0" * 64}, "made for base 000000000000…, not this base"),
        ({"shape": True}, "has shape"),
    ],
)
def test_audit_refuses_an_adapter_for_another_base(
    zoo, fake_files, monkeypatch, capsys, tmp_path, change, fragment
):
    other = load_update(zoo / "plain-flip")
    if "shape" in change:
        name = next(iter(other.deltas))
        other.deltas = {name: other.dense()[name][:, :-1]}
    else:
        other.meta.update(change)
    other.save(tmp_path / "other")
    out = tmp_path / "audit"
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", "--base", str(zoo / "model"),
        "--task", f"rot90={zoo / 'prot'}:{zoo / 'rot90.jsonl'}",
        "--task", f"flip={tmp_path / 'other'}:{zoo / 'flip.jsonl'}",
        "--protected", "rot90", "--out", str(out),
    )  # fmt: skip
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'other'}: ") and fragment in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything is trained or written


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--protected", "mnist"], "--protected 'mnist': not one of the tasks rot90, flip"),
        ([], "--protected NAME"),
        (["--protected", "flip"], "--protected flip: the task has no adapter to audit"),
        (["--protected", "rot90", "--scoring", "best"], "--scoring 'best'"),
        (["--protected", "rot90", "--suite", "digits"], "not --suite"),
    ],
)
def test_audit_from_files_bad_options(zoo, fake_files, monkeypatch, capsys, tmp_path, args, fragment):
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", "--base", str(zoo / "model"),
        "--task", f"rot90={zoo / 'prot'}:{zoo / 'rot90.jsonl'}", "--task", f"flip=:{zoo / 'flip.jsonl'}",
        "--out", str(tmp_path / "audit"), *args,
    )  # fmt: skip
    assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "audit").exists()


def test_bench_from_files_trains_the_protected_update_over_the_given_pool(
    zoo, fake_files, monkeypatch, capsys, tmp_path
):
    (tmp_path / "bench.yaml").write_text(
        "modes: [lora]\nlora: {mode: lora, steps: 20, eval_every: 20}\nmethods: [ta]\nthreats: none\n"
        "scales: [0.5, 1.0, 2.0]\n"
    )
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "bench", "--base", str(zoo / "model"),
        "--task", f"rot90=:{zoo / 'rot90.jsonl'}",
        "--task", f"flip={zoo / 'plain-flip'}:{zoo / 'flip.jsonl'}",
        "--protected", "rot90", "--device", "cpu", "--config", str(tmp_path / "bench.yaml"),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "bench.json").read_text())
    assert summary["targets"] == ["rot90"] and summary["train"]["lora"]["device"] == "cpu"
    report = json.loads((out / "lora" / "rot90" / "report.json").read_text())
    assert report["pool"] == {"rot90": "trained", "flip": "given"}
    trained = sorted(p.name.split("-")[1:4] for p in (out / "updates").iterdir())
    assert trained == [["rot90", "lora", "none"], ["rot90", "lora", "trap2"]]  # flip's adapter was given
    assert "# trap2 bench" in stdout
