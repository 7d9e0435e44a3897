"""``make_suite``: the one way to build a :class:`Suite`, checking the invariants the rest of trap2 relies on.

A suite is a backbone W0 and tasks that share it. What the trainers, merges and attacks assume, and
what :func:`make_suite` checks (each failure is a one-line :class:`ConfigError` naming the task):

- every split's inputs are ONE tensor ``x`` (N, ...) and its targets an int64 tensor ``y`` whose first
  dimension is N (class ids (N,), or token ids (N, L) for a language-model loss);
- a task without its own ``evaluate`` is scored by ``head(backbone(x)).argmax(-1) == y``: the head maps
  the backbone's output for a batch to (B, n_classes) logits, and every label is in [0, n_classes)
  (or is the loss's ``ignore_index``);
- the LoRA target names are modules of the backbone, and the default target is one of the tasks;
- an update's keys are the backbone's parameter names, and ``fingerprint`` identifies W0 (an update that
  records another base is refused); when not given it is computed from the backbone's weights
  (:func:`trap2.updates.tensors_fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from trap2.errors import ConfigError
from trap2.suites.base import Split, Suite, Task
from trap2.updates import tensors_fingerprint


def make_suite(
    name: str,
    tasks: Mapping[str, Task] | Sequence[Task],
    make_backbone: Callable[[], nn.Module],
    *,
    lora_targets: Sequence[str],
    default_target: str | None = None,
    fingerprint: str | None = None,
    backbone: nn.Module | None = None,
    info: Mapping[str, object] | None = None,
    full_frozen: Sequence[str] = (),
    recipes: Mapping[str, Mapping[str, object]] | None = None,
) -> Suite:
    """A checked :class:`Suite` (see the module docstring for what is checked).

    ``make_backbone`` returns a fresh backbone holding W0 each call; ``backbone`` is one already built
    (used for the checks instead of building another). ``fingerprint``: e.g. the sha256 of the weights
    file; default: computed from the backbone's weights. ``recipes``: TrainConfig fields per mode
    ('lora', 'full') that ``trap2 bench`` trains with.
    """
    by_name = dict(tasks) if isinstance(tasks, Mapping) else {t.name: t for t in tasks}
    if not by_name:
        raise ConfigError(f"suite {name!r}: no tasks")
    if not isinstance(tasks, Mapping) and len(by_name) != len(tasks):
        raise ConfigError(f"suite {name!r}: two tasks share a name")
    for key, task in by_name.items():
        if key != task.name:
            raise ConfigError(f"suite {name!r}: task {task.name!r} is filed under {key!r}")
    default_target = default_target or next(iter(by_name))
    if default_target not in by_name:
        raise ConfigError(
            f"suite {name!r}: default target {default_target!r} is not a task ({', '.join(by_name)})"
        )
    backbone = backbone if backbone is not None else make_backbone()
    modules = [n for n, _ in backbone.named_modules()]
    for target in lora_targets:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise ConfigError(f"suite {name!r}: LoRA target {target!r} is not a module of the backbone")
    for task in by_name.values():
        check_task(backbone, task, f"suite {name!r}, task {task.name!r}")
    if fingerprint is None:
        fingerprint = tensors_fingerprint(dict(backbone.named_parameters()))
    return Suite(
        name=name,
        tasks=by_name,
        make_backbone=make_backbone,
        lora_targets=tuple(lora_targets),
        default_target=default_target,
        fingerprint=fingerprint,
        info=dict(info or {}),
        full_frozen=tuple(full_frozen),
        recipes={k: dict(v) for k, v in (recipes or {}).items()},
    )


@torch.no_grad()
def check_task(backbone: nn.Module, task: Task, where: str) -> None:
    """One task's splits, labels and head against ``backbone`` (see the module docstring)."""
    if task.n_classes < 1:
        raise ConfigError(f"{where}: n_classes is {task.n_classes}")
    ignore = getattr(task.loss, "ignore_index", None)
    for split_name in ("train", "val", "test"):
        split = task.split(split_name)
        here = f"{where}, split {split_name}"
        if not isinstance(split, Split) or not torch.is_tensor(split.x) or not torch.is_tensor(split.y):
            raise ConfigError(f"{here}: inputs and labels must each be one tensor (a Split(x, y))")
        if split.y.dtype != torch.int64 or split.y.dim() < 1:
            raise ConfigError(
                f"{here}: labels must be int64 (N,) or (N, L), got {split.y.dtype} {tuple(split.y.shape)}"
            )
        if split.x.shape[0] != split.y.shape[0]:
            raise ConfigError(f"{here}: {split.x.shape[0]} inputs but {split.y.shape[0]} labels")
        if len(split) == 0:
            raise ConfigError(f"{here}: empty")
        counted = split.y[split.y != ignore] if ignore is not None else split.y
        low, high = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
        if low < 0 or high >= task.n_classes:
            raise ConfigError(f"{here}: labels must be in [0, {task.n_classes}), got {low}…{high}")
    if task.evaluate is not None:
        return  # scored by its own metric: the head's output is its business
    was_training = backbone.training
    backbone.eval()
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    logits = task.head_on(device)(backbone(task.train.x[:2].to(device)))
    backbone.train(was_training)
    want = (min(2, len(task.train)), task.n_classes)
    if tuple(logits.shape) != want:
        raise ConfigError(
            f"{where}: head(backbone(x)) has shape {tuple(logits.shape)} for 2 inputs, expected {want}"
        )
