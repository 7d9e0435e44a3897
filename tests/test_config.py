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


def test_a_later_field_at_its_default_keeps_old_cache_keys():
    """objective.collateral, objective.law and protect_steps came after results were cached: at their
    defaults the key is what it was without them."""
    old = to_dict(TrainConfig())
    del old["objective"]["collateral"], old["objective"]["law"], old["protect_steps"]
    assert config_hash(TrainConfig()) == config_hash(old)
    assert config_hash(TrainConfig(objective=ObjectiveConfig(law="log"))) != config_hash(old)
    on = TrainConfig(objective=ObjectiveConfig(collateral=2.0))
    assert config_hash(on) != config_hash(TrainConfig()) != config_hash(TrainConfig(protect_steps=900))
    assert to_dict(on)["objective"]["collateral"] == 2.0  # saved configs still spell it out
