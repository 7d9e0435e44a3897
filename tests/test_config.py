import dataclasses
import re
from pathlib import Path

import pytest

from trap2.config import (
    LoraSettings,
    ObjectiveConfig,
    TrainConfig,
    config_hash,
    from_dict,
    load_yaml,
    to_dict,
)
from trap2.errors import ConfigError


def test_defaults_are_the_reference_ones():
    c = ObjectiveConfig()
    assert (c.s_min, c.s_max, c.delta, c.weight, c.n_samples, c.bound) == (0.05, 2.0, 0.05, "inv", 1, None)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"delta": 0.95}, "delta < 1 - s_min"),
        ({"delta": 0.99, "s_min": 0.05}, "delta < 1 - s_min"),
        ({"lam": -0.1}, "lam must be >= 0"),
        ({"s_min": 0.0}, "s_min must be in (0, 1)"),
        ({"s_max": 1.04}, "s_max > 1 + delta"),
        ({"weight": "square"}, "inv, inv_sqrt, none"),
        ({"n_samples": 0}, "n_samples"),
        ({"bound": 0.0}, "bound"),
        ({"lam": float("nan")}, "finite"),
    ],
)
def test_objective_config_rejects(kwargs, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        ObjectiveConfig(**kwargs)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_dora_is_rejected_with_the_reason():
    with pytest.raises(ConfigError, match="DoRA"):
        LoraSettings(use_dora=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "qlora"},
        {"steps": 0},
        {"lr": -1.0},
        {"select": "median"},
        {"device": "tpu"},
        {"betas": (0.9,)},
    ],
)
def test_train_config_rejects(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig(mode="full", steps=7, objective=ObjectiveConfig(lam=0.2, bound=50.0))
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown key.*lamda.*valid: name, lam"):
        from_dict(TrainConfig, {"objective": {"lamda": 1}})


def test_yaml_numbers_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  objective: {lam: 5e-3}\n")
    cfg = from_dict(TrainConfig, load_yaml(p)["train"])
    assert cfg.lr == 1e-3 and cfg.objective.lam == 5e-3
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")


def test_config_hash_tracks_every_field():
    a, b = TrainConfig(), TrainConfig(objective=ObjectiveConfig(delta=0.06))
    assert config_hash(a) == config_hash(TrainConfig()) != config_hash(b)


HARDENING_FIELDS = (
    "operators",
    "keep_min",
    "keep_max",
    "lookahead_steps",
    "lookahead_lr",
    "lookahead_objective",
    "lookahead_update",
)


def test_a_later_field_at_its_default_keeps_old_cache_keys():
    """objective.collateral, objective.law, objective.balance, the hardening fields and protect_steps came
    after results were cached: at their defaults the key is what it was without them."""
    old = to_dict(TrainConfig())
    del old["objective"]["collateral"], old["objective"]["law"], old["protect_steps"]
    del old["objective"]["balance"]
    for later in HARDENING_FIELDS:
        del old["objective"][later]
    assert config_hash(TrainConfig()) == config_hash(old)
    for later, value in [
        ("operators", "scale,trim"),
        ("lookahead_steps", 1),
        ("keep_min", 0.2),
        ("balance", 1.0),
    ]:
        assert config_hash(TrainConfig(objective=ObjectiveConfig(**{later: value}))) != config_hash(old)
    assert config_hash(TrainConfig(objective=ObjectiveConfig(law="log"))) != config_hash(old)
    on = TrainConfig(objective=ObjectiveConfig(collateral=2.0))
    assert config_hash(on) != config_hash(TrainConfig()) != config_hash(TrainConfig(protect_steps=900))
    assert to_dict(on)["objective"]["collateral"] == 2.0  # saved configs still spell it out


# --- ObjectiveConfig is the one source of the objective's knobs (issue #20, defect 3) ------------------

# One value per field, each different from the field's default. A field added to ObjectiveConfig without
# a value here fails the check below: it must be carried through YAML, the CLI and the Trainer.
NON_DEFAULT = {
    "name": "none",
    "lam": 0.02,
    "s_min": 0.1,
    "s_max": 1.5,
    "delta": 0.08,
    "weight": "inv_sqrt",
    "n_samples": 3,
    "law": "log",
    "bound": 50.0,
    "balance": 0.5,
    "collateral": 0.3,
    "operators": "layer_scale,spectral",
    "keep_min": 0.2,
    "keep_max": 0.8,
    "lookahead_steps": 2,
    "lookahead_lr": 0.01,
    "lookahead_objective": "flatten",
    "lookahead_update": "sgd",
}


def non_default_objective() -> ObjectiveConfig:
    fields = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    assert set(NON_DEFAULT) == set(fields), "give every ObjectiveConfig field a non-default value here"
    for name, f in fields.items():
        assert NON_DEFAULT[name] != f.default, name
    return ObjectiveConfig(**NON_DEFAULT)


def test_every_objective_field_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = non_default_objective()
    assert from_dict(ObjectiveConfig, to_dict(cfg)) == cfg
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"objective": to_dict(cfg)}}))
    assert from_dict(TrainConfig, load_yaml(p)["train"]).objective == cfg


def test_every_objective_field_round_trips_through_the_cli(monkeypatch):
    """`trap2 train --objective ... --lam ... --s-min ...`: one option per field, named after it."""
    from typer.testing import CliRunner

    import trap2.training
    from trap2.cli import app

    cfg = non_default_objective()
    seen = []

    def capture(suite, task, train_cfg, *args, **kwargs):
        seen.append(train_cfg)
        raise SystemExit(0)  # stop before training

    monkeypatch.setattr(trap2.training, "train_update", capture)
    argv = ["train", "--out", "unused"]
    for f in dataclasses.fields(ObjectiveConfig):
        flag = "--objective" if f.name == "name" else "--" + f.name.replace("_", "-")
        argv += [flag, str(getattr(cfg, f.name))]
    r = CliRunner().invoke(app, argv)
    assert seen, r.output
    assert seen[0].objective == cfg


def test_every_objective_field_round_trips_through_the_trainer_arguments(tmp_path):
    """ObjectiveConfig -> trap2_* arguments -> ObjectiveConfig, as keywords and as HfArgumentParser flags."""
    from transformers import HfArgumentParser

    from trap2.hf import Trap2TrainingArguments

    cfg = non_default_objective()
    kwargs = Trap2TrainingArguments.objective_arguments(cfg)
    legacy = {"name": "trap2_objective", "lam": "trap2_lambda"}  # the two names publishers already use
    assert set(kwargs) == {legacy.get(f.name, f"trap2_{f.name}") for f in dataclasses.fields(ObjectiveConfig)}
    args = Trap2TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)
    for mode in ("lora", "full"):
        assert args.objective_config(mode) == cfg
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    for arg, value in kwargs.items():
        argv += [f"--{arg}", str(value)]
    (parsed,) = HfArgumentParser(Trap2TrainingArguments).parse_args_into_dataclasses(argv)
    assert parsed.objective_config("lora") == cfg
    # the help text is the config's
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Trap2TrainingArguments)}
    for f in dataclasses.fields(ObjectiveConfig):
        assert helps[legacy.get(f.name, f"trap2_{f.name}")].startswith(f.metadata["help"]), f.name


def _docs_knob_table() -> dict[str, str]:
    """{knob: default cell} of docs/training.md's table under 'The objective and its knobs'."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## The objective and its knobs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")]
        if len(defaults) != len(names):
            defaults = [cells[1]] * len(names)
        rows.update(zip(names, defaults, strict=True))
    return rows


def _table_value(cell: str) -> object:
    token = cell.split(" (")[0].strip().strip("`")
    if token == "none":
        return None
    try:
        return float(token)
    except ValueError:
        return token


def test_docs_knob_table_lists_every_objective_field_with_its_default():
    table = _docs_knob_table()
    for f in dataclasses.fields(ObjectiveConfig):
        assert f.name in table, f"docs/training.md's knob table lacks objective.{f.name}"
        want = f.default if not isinstance(f.default, int) else float(f.default)
        assert _table_value(table[f.name]) == want, (f.name, table[f.name], f.default)
