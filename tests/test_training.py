import dataclasses

import pytest
import torch

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError, TrainingError
from trap2.eval import accuracy, base_state, scaling_curve
from trap2.objectives import OBJECTIVES
from trap2.objectives.base import StepStats
from trap2.training import train_update
from trap2.updates import apply_delta

SHORT = TrainConfig(steps=40, eval_every=20, warmup_steps=5)


def test_lambda_zero_is_exactly_plain_fine_tuning(digits):
    """Only the objective differs: same batches, optimiser, schedule and dropout stream."""
    cfg = dataclasses.replace(SHORT, lora=LoraSettings(dropout=0.2))
    plain = train_update(digits, "flip", dataclasses.replace(cfg, objective=ObjectiveConfig(name="none")))
    zero = train_update(digits, "flip", dataclasses.replace(cfg, objective=ObjectiveConfig(lam=0.0)))
    for k, v in plain.update.dense().items():
        assert torch.equal(v, zero.update.dense()[k]), k


def test_heads_are_frozen_and_the_update_is_the_backbone_only(digits):
    head_before = digits.task("ge5").head.prototypes.clone()
    r = train_update(digits, "ge5", dataclasses.replace(SHORT, mode="full"))
    assert torch.equal(head_before, digits.task("ge5").head.prototypes)
    names = {n for n, _ in digits.make_backbone().named_parameters()}
    assert set(r.update.deltas) == names  # every backbone parameter, nothing else
    assert r.update.meta["base_fingerprint"] == digits.fingerprint


def test_select_best_releases_the_best_validation_checkpoint(digits):
    r = train_update(digits, "invert", dataclasses.replace(SHORT, select="best", steps=60, eval_every=10))
    assert r.val_acc == pytest.approx(max(row["val_acc"] for row in r.history))


class _NaNEvery:
    name = "nan_test"

    def __init__(self, cfg, period):
        self.period, self.calls = period, 0

    def backward(self, model, x, y, loss_fn, gen):
        self.calls += 1
        loss = loss_fn(model(x), y)
        if self.calls % self.period == 0:
            loss = loss * float("nan")
        loss.backward()
        return StepStats(loss=float(loss.detach()), nominal=float(loss.detach()))


@pytest.fixture
def nan_objective():
    OBJECTIVES.register("nan_test", lambda cfg: _NaNEvery(cfg, 3))
    OBJECTIVES.register("nan_always", lambda cfg: _NaNEvery(cfg, 1))
    yield
    del OBJECTIVES._items["nan_test"], OBJECTIVES._items["nan_always"]


def test_non_finite_steps_are_skipped_and_counted(digits, nan_objective):
    cfg = dataclasses.replace(SHORT, steps=30, objective=ObjectiveConfig(name="nan_test"))
    r = train_update(digits, "flip", cfg)
    assert r.skipped_steps == 10
    assert all(torch.isfinite(d).all() for d in r.update.dense().values())
    with pytest.raises(TrainingError, match="5 non-finite steps in a row"):
        train_update(
            digits,
            "flip",
            dataclasses.replace(cfg, objective=ObjectiveConfig(name="nan_always"), max_nonfinite_in_row=5),
        )


def test_bad_lora_targets_are_a_clear_error(digits):
    with pytest.raises(ConfigError, match="LoRA could not be applied"):
        train_update(digits, "flip", dataclasses.replace(SHORT, lora=LoraSettings(target_modules=("nope",))))


@pytest.mark.slow  # 2 × 300 steps per mode
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_protected_curve_collapses_off_nominal_and_plain_does_not(digits, mode):
    """The behaviour the method promises, on a short real run."""
    cfg = TrainConfig(mode=mode, steps=300, eval_every=300, warmup_steps=30)
    task = digits.task("rot90")
    bb = digits.make_backbone()
    curves = {}
    for name in ("none", "trap2"):
        r = train_update(digits, "rot90", dataclasses.replace(cfg, objective=ObjectiveConfig(name=name)))
        curves[name] = dict(
            zip((0.5, 1.0, 2.0), scaling_curve(bb, task, r.update.dense(), (0.5, 1.0, 2.0)), strict=True)
        )
    plain, prot = curves["none"], curves["trap2"]
    assert plain[1.0] > 0.85 and prot[1.0] > 0.8
    assert plain[0.5] > 0.7 * plain[1.0]
    assert prot[0.5] < 0.5 * prot[1.0] and prot[2.0] < 0.5 * prot[1.0]


def test_update_applies_the_same_as_the_trained_peft_model(digits):
    r = train_update(digits, "shuffle", SHORT)
    task = digits.task("shuffle")
    bb = digits.make_backbone()
    via_delta = accuracy(bb, task, "val", apply_delta(base_state(bb), r.update.dense(), 1.0))
    assert via_delta == pytest.approx(r.val_acc)


def test_protect_steps_lengthens_the_protected_run_only(digits):
    """The protected run takes protect_steps with the schedule stretched to them; the plain run it is
    compared with keeps steps, and is exactly the plain run of a config without the field."""
    cfg = dataclasses.replace(SHORT, protect_steps=60)
    protected = train_update(digits, "flip", cfg)
    assert protected.history[-1]["step"] == 60
    longer = train_update(digits, "flip", dataclasses.replace(SHORT, steps=60))
    for k, v in longer.update.dense().items():  # the same as asking for 60 steps outright
        assert torch.equal(v, protected.update.dense()[k]), k

    plain = train_update(digits, "flip", cfg.plain())
    assert plain.history[-1]["step"] == SHORT.steps
    reference = train_update(
        digits, "flip", dataclasses.replace(SHORT, objective=ObjectiveConfig(name="none"))
    )
    for k, v in reference.update.dense().items():
        assert torch.equal(v, plain.update.dense()[k]), k
    with pytest.raises(ConfigError, match="protect_steps"):
        TrainConfig(protect_steps=0)
