"""``trap2 protect``: trap an update you already have, from unlabelled inputs, in a short run.

The given update (a PEFT LoRA folder or a dense delta made on a suite's backbone) is the teacher: its
outputs at s = 1 on the inputs are computed once, in eval mode, and frozen. The student starts from
the same update and trains with the ``trap2_distill`` objective (:mod:`trap2.objectives.self_distill`):
match the teacher at s = 1, be wrong at the paper's off-nominal scales (or, with
``objective.operators``, at the hardened objective's operators: docs/hardening.md). No labels are read unless
``targets='labels'``, which runs the paper's labelled objective (``trap2``) from the update instead.

The optimiser, schedule and step are the built-in loop's (:mod:`trap2.training.loop`); the released
update records the protection settings and the teacher (its tensors' fingerprint and its own metadata).
Bad input fails before anything is trained or written: an update for another base, one that is already
protected (unless ``force``), inputs of the wrong shape or type, an empty input set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trap2.config import ObjectiveConfig, TrainConfig, help_field
from trap2.errors import ConfigError, DataError, UpdateFileError
from trap2.eval.evaluate import base_state
from trap2.io import load_tensors
from trap2.objectives import Objective, get_objective
from trap2.objectives.self_distill import MATCHES, SelfDistillObjective
from trap2.scaling import base_params
from trap2.suites.base import Split, Suite, Task, TaskModel
from trap2.training.loop import (
    TrainResult,
    _evaluate,
    _release,
    _Run,
    _run_for,
    _step,
    resolve_device,
    start_from,
    trainable_backbone,
)
from trap2.updates import LowRank, Update, tensors_fingerprint

log = logging.getLogger(__name__)

TARGETS = ("teacher", "labels")


def _default_train() -> TrainConfig:
    return TrainConfig(
        objective=ObjectiveConfig(name="trap2_distill", lam=0.1),
        steps=100,
        warmup_steps=10,
        eval_every=100,
    )


@dataclass(frozen=True)
class ProtectConfig:
    """The protect phase: a short run of the built-in loop (``train``: steps, lr, schedule, the objective's
    λ and scales; ``train.mode`` follows the update) against the teacher's outputs or the labels."""

    train: TrainConfig = help_field(
        "the protect run: objective (trap2_distill: λ, s_min, s_max, δ, w(s), law, bound, collateral, "
        "operators), steps, "
        "batch size, lr, warm-up, seed, device",
        default_factory=_default_train,
    )
    targets: str = help_field(
        "'teacher': distil the given update's own predictions (no labels read); 'labels': the paper's "
        "labelled objective (trap2) started from the update",
        "teacher",
    )
    match: str = help_field("teacher matching at s = 1: 'kl' on the head's logits, 'mse' on features", "kl")
    temperature: float = help_field("distillation temperature T of the KL term", 1.0)
    off_fraction: float = help_field(
        "fraction of each batch the off-nominal passes see (the teacher match at s = 1 sees all of it): "
        "a cheaper step, so more steps fit the same compute",
        1.0,
    )
    repair: float = help_field(
        "fraction of the steps, at the end, that are the teacher match alone (no off-nominal passes, the "
        "cost of a plain step): the trap is carved first, then the predictions at s = 1 are pulled back to "
        "the teacher's; 0 = the off-nominal term on every step",
        0.0,
    )
    off_every: int = help_field(
        "run the off-nominal passes on every N-th step only, with λ·N (the steps between are the teacher "
        "match alone, at the cost of a plain step)",
        1,
    )

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise ConfigError(f"protect.targets must be one of {', '.join(TARGETS)}; got {self.targets!r}")
        if self.match not in MATCHES:
            raise ConfigError(f"protect.match must be one of {', '.join(MATCHES)}; got {self.match!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"protect.temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.off_fraction, (int, float)) and 0 < self.off_fraction <= 1):
            raise ConfigError(f"protect.off_fraction must be in (0, 1], got {self.off_fraction!r}")
        if not (isinstance(self.repair, (int, float)) and 0 <= self.repair < 1):
            raise ConfigError(f"protect.repair must be in [0, 1), got {self.repair!r}")
        if not isinstance(self.off_every, int) or isinstance(self.off_every, bool) or self.off_every < 1:
            raise ConfigError(f"protect.off_every must be an integer >= 1, got {self.off_every!r}")
        if self.targets == "labels" and (self.off_fraction != 1 or self.off_every != 1 or self.repair):
            raise ConfigError(
                "protect.repair, off_fraction and off_every apply to targets='teacher' (trap2_distill)"
            )
        want = "trap2_distill" if self.targets == "teacher" else "trap2"
        if self.train.objective.name != want:  # the objective follows the targets
            objective = dataclasses.replace(self.train.objective, name=want)
            object.__setattr__(self, "train", dataclasses.replace(self.train, objective=objective))


def trap_steps(cfg: ProtectConfig, steps: int | None = None) -> int | None:
    """How many of the protect run's first steps carry the off-nominal term (None: every step); ``steps``:
    the run's length (default ``cfg.train.steps``; ``Trap2ProtectTrainer`` passes its ``max_steps``)."""
    steps = cfg.train.steps if steps is None else steps
    return round(steps * (1 - cfg.repair)) if cfg.repair else None


def protect_objective(cfg: ProtectConfig) -> Objective:
    """The protect run's objective: ``trap2_distill`` with the phase's match, temperature, off_fraction,
    off_every and repair steps (targets='teacher'; ``y`` is then the teacher's outputs), or the labelled
    ``trap2`` (targets='labels')."""
    if cfg.targets == "teacher":
        return SelfDistillObjective(
            cfg.train.objective, cfg.match, cfg.temperature, cfg.off_fraction, cfg.off_every, trap_steps(cfg)
        )
    return get_objective(cfg.train.objective)


def protect_settings(cfg: ProtectConfig) -> dict[str, Any]:
    """The protect phase's settings as a release records them under ``protect`` (the built-in loop and
    ``Trap2ProtectTrainer`` alike)."""
    return {
        "targets": cfg.targets,
        "match": cfg.match,
        "temperature": cfg.temperature,
        "repair": cfg.repair,
        "off_fraction": cfg.off_fraction,
        "off_every": cfg.off_every,
    }


@dataclass
class ProtectResult:
    update: Update
    peft_model: Any  # the trained PeftModel (LoRA), for saving in PEFT's own format; None for dense
    agreement: float  # top-1 agreement with the teacher at s = 1 on the task's test inputs
    acc_teacher: float  # standalone test accuracy of the given update
    acc_protected: float  # ... and of the protected one
    history: list[dict[str, float]]


def update_fingerprint(update: Update) -> str:
    """The fingerprint of an update's values (its dense ΔW), recorded as the teacher of a protected one."""
    return tensors_fingerprint(update.dense())


def protection_of(update: Update) -> str | None:
    """The protecting objective recorded in an update's metadata, or None for a plain one."""
    objective = update.meta.get("objective")
    name = objective.get("name") if isinstance(objective, Mapping) else None
    if update.meta.get("protect") or (name and name != "none"):
        return str(name or "trap2_distill")
    return None


def check_inputs(inputs: torch.Tensor, task: Task, where: str = "inputs") -> None:
    """The inputs must be a non-empty batch shaped and typed like the task's own inputs."""
    ref = task.train.x
    if not isinstance(inputs, torch.Tensor):
        raise DataError(f"{where}: expected a tensor of inputs, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise DataError(f"{where}: no inputs (an empty set); give at least one unlabelled input of the task")
    if tuple(inputs.shape[1:]) != tuple(ref.shape[1:]):
        raise DataError(
            f"{where}: each input has shape {tuple(inputs.shape[1:])}, task {task.name!r} takes "
            f"{tuple(ref.shape[1:])}"
        )
    if inputs.is_floating_point() != ref.is_floating_point():
        raise DataError(
            f"{where}: inputs of dtype {inputs.dtype}, task {task.name!r} takes {ref.dtype} (another modality?)"
        )


SPLIT_INPUTS = ("train", "val")


def load_inputs(source: str | Path, task: Task) -> torch.Tensor:
    """Unlabelled inputs for ``task``: a split's inputs by name ('train', 'val'; labels dropped), or a
    ``.safetensors`` file holding one tensor (or one named ``x``) of shape (N, ...) like the task's."""
    if str(source) in SPLIT_INPUTS:
        return task.split(str(source)).x
    path = Path(source)
    if path.suffix != ".safetensors":
        raise DataError(
            f"--inputs {source}: give a split name ({', '.join(SPLIT_INPUTS)}) or a .safetensors file of inputs"
        )
    try:
        tensors, _ = load_tensors(path)
    except UpdateFileError as e:
        raise DataError(str(e)) from None
    if len(tensors) != 1 and "x" not in tensors:
        raise DataError(f"{path}: holds {len(tensors)} tensors; name the inputs 'x'")
    return tensors["x"] if "x" in tensors else next(iter(tensors.values()))


def _lora_model(suite: Suite, update: Update, device: torch.device) -> torch.nn.Module:
    """The suite's backbone with the update's LoRA branches (PEFT), loaded exactly."""
    from peft import LoraConfig, get_peft_model

    from trap2.scaling import lora_layers

    if any(not isinstance(d, LowRank) for d in update.deltas.values()):
        raise UpdateFileError(
            "protect: LoRA biases (lora_bias) are not supported; give the update as a dense delta"
        )
    raw = update.peft_config or update._peft_config_dict()
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {
        k: v
        for k, v in raw.items()
        if k in fields
        and k not in ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode")
    }
    try:
        backbone = get_peft_model(suite.make_backbone(), LoraConfig(**kwargs))
    except (ValueError, TypeError) as e:
        raise UpdateFileError(
            f"protect: the adapter does not fit the suite's backbone ({str(e).splitlines()[0]})"
        ) from None
    base = backbone.get_base_model()
    names = {id(m): n for n, m in base.named_modules()}
    layers = {f"{names[id(m)]}.weight": m for m in lora_layers(base)}
    if set(layers) != set(update.deltas):
        missing = sorted(set(update.deltas) ^ set(layers))[0]
        raise UpdateFileError(f"protect: the adapter's modules do not match its config (e.g. {missing!r})")
    with torch.no_grad():
        for key, m in layers.items():
            d = update.deltas[key]
            m.lora_A["default"].weight.copy_(d.A)
            m.lora_B["default"].weight.copy_(d.B)
            m.scaling["default"] = d.scaling  # exactly the adapter's (α/r, rsLoRA, patterns)
    return backbone.to(device)


def _model(
    suite: Suite, task: Task, update: Update, mode: str, device: torch.device
) -> tuple[TaskModel, Any]:
    """The student, at W0 + ΔW of the given update: (model, W0 of the trainable parameters in full mode)."""
    if mode == "lora":
        model = TaskModel(_lora_model(suite, update, device), task.head_on(device)).to(device)
        return model, None
    backbone = trainable_backbone(suite, TrainConfig(mode="full"))
    frozen = sorted(n for n, p in backbone.named_parameters() if not p.requires_grad and n in update.deltas)
    if frozen:
        raise UpdateFileError(
            f"protect: {frozen[0]!r} is a parameter the suite keeps frozen in full fine-tuning"
        )
    model = TaskModel(backbone, task.head_on(device)).to(device)
    w0 = base_params(model)
    start_from(model.backbone, {n: d.to(device) for n, d in update.dense().items()})
    return model, w0


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs on ``inputs`` in eval mode (no dropout), on the CPU: (N, C)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat(
        [
            model(inputs[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(inputs), batch_size)
        ]
    )
    model.train(was)
    return out


@torch.no_grad()
def _agreement(
    model: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, float]:
    """(top-1 agreement with the teacher, the model's accuracy, the teacher's accuracy) on (x, y)."""
    pred = teacher_outputs(model, x).argmax(-1)
    ref = teacher.argmax(-1)
    return (
        float((pred == ref).float().mean()),
        float((pred == y).float().mean()),
        float((ref == y).float().mean()),
    )


@dataclass
class ProtectRun:
    """A prepared protect phase: the loop's run state (student, optimiser, teacher outputs as its training
    targets), the task, and what the release records. :func:`protect_update` steps it to the end;
    ``benchmarks/protect_cost.py`` times its steps."""

    run: _Run
    task: Task
    n_inputs: int  # the inputs the teacher ran on (at most steps × batch size)
    test_teacher: torch.Tensor  # (N_test, C): the teacher's outputs on the task's test inputs
    teacher: dict[str, Any]  # recorded in the release: the teacher's fingerprint and metadata


def prepare_protect(
    suite: Suite,
    update: Update,
    cfg: ProtectConfig | None = None,
    inputs: torch.Tensor | None = None,
    task: str | None = None,
    force: bool = False,
    where: str = "update",
) -> ProtectRun:
    """Check the update and the inputs (one-line errors), build the student from the update and compute
    the teacher's outputs once; see :func:`protect_update`."""
    cfg = cfg or ProtectConfig()
    task_name = task or update.meta.get("task")
    if task_name is None:
        raise ConfigError(f"{where}: the update does not record its task; pass --task")
    t = suite.task(str(task_name))
    if t.evaluate is not None:
        raise ConfigError(
            f"protect: task {t.name!r} is scored by its own metric (generation), not by a head's logits"
        )
    update.check_base(base_state(suite.make_backbone()), suite.fingerprint, where=where)
    prior = protection_of(update)
    if prior and not force:
        raise ConfigError(
            f"{where}: already carries Trap² settings (objective {prior!r}); --force protects it again with it "
            "as the teacher and records its settings under 'teacher'"
        )
    x = t.train.x if inputs is None else inputs
    check_inputs(x, t, "inputs")
    if cfg.targets == "labels" and inputs is not None:
        raise ConfigError(
            "protect: targets='labels' trains on the task's labelled training split; give no inputs"
        )

    mode = "lora" if update.kind == "lora" else "full"
    train = dataclasses.replace(cfg.train, mode=mode).resolved()
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    model, w0 = _model(suite, t, update, mode, device)
    seen = train.steps * train.batch_size
    if cfg.targets == "teacher" and len(x) > seen:  # the teacher runs on the inputs the run sees
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(train.seed))[:seen]]
    teacher = teacher_outputs(model, x)  # (N, C), frozen
    run_task = dataclasses.replace(t, train=Split(x, teacher)) if cfg.targets == "teacher" else t
    run = _run_for(train, run_task, protect_objective(cfg), device, model, w0)
    recorded = {"fingerprint": update_fingerprint(update), "meta": dict(update.meta)}
    return ProtectRun(run, t, int(len(x)), teacher_outputs(model, t.test.x), recorded)


def protect_update(
    suite: Suite,
    update: Update,
    cfg: ProtectConfig | None = None,
    inputs: torch.Tensor | None = None,
    task: str | None = None,
    force: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    where: str = "update",
) -> ProtectResult:
    """Protect ``update`` (made on ``suite``'s backbone for ``task``, default: the task it records).

    ``inputs``: unlabelled inputs of the task, (N, ...) like the task's own (default: its training
    inputs, labels dropped; more than the run's steps × batch size sees: a seeded subset of that many, so
    the teacher runs on no input the student does not see). ``force``: protect an update that already carries Trap² settings again,
    with it as the teacher (its settings are kept under ``teacher``). Nothing is written: save the
    result with ``result.update.save(out, peft_model=result.peft_model)``.
    """
    cfg = cfg or ProtectConfig()
    p = prepare_protect(suite, update, cfg, inputs, task, force, where)
    run, train = p.run, p.run.cfg
    for step in range(1, train.steps + 1):
        if _step(run, step) and (step % train.eval_every == 0 or step == train.steps):
            _evaluate(run, step, progress)
    released: TrainResult = _release(run, suite, p.task.name)
    agreement, acc, acc_teacher = _agreement(run.model, p.task.test.x, p.test_teacher, p.task.test.y)
    meta = released.update.meta
    meta["protect"] = {
        **protect_settings(cfg),
        "inputs": p.n_inputs,
        "steps": train.steps,
        "agreement_test": agreement,
    }
    meta["teacher"] = p.teacher
    return ProtectResult(released.update, released.peft_model, agreement, acc_teacher, acc, released.history)
