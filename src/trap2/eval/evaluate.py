"""Accuracy of a backbone, possibly at W0 + c·ΔW, on a task's split; and the scaling curve acc(s).

Evaluation runs where the backbone lives: inputs, parameter overrides and (copies of) the frozen heads
are moved to its device; a suite's own modules are never moved in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from trap2.suites.base import Split, Task
from trap2.updates import apply_delta


def backbone_device(backbone: nn.Module) -> torch.device:
    first = next(iter(backbone.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(
    backbone: nn.Module,
    task: Task,
    split: Split | str = "test",
    params: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 2048,
) -> float:
    """Fraction correct of ``task.head(backbone(x))`` on the backbone's device; ``params`` overrides
    backbone parameters."""
    data = task.split(split) if isinstance(split, str) else split
    if task.evaluate is not None:  # the task's own metric (e.g. exact match of generated answers)
        return task.evaluate(backbone, data, params)
    device = backbone_device(backbone)
    head = task.head_on(device)
    if params is not None:
        params = {n: p.to(device) for n, p in params.items()}
    was_training = backbone.training
    backbone.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.x[i : i + batch_size].to(device)
        feats = backbone(x) if params is None else functional_call(backbone, dict(params), (x,), strict=False)
        correct += int((head(feats).argmax(-1).cpu() == data.y[i : i + batch_size]).sum())
    backbone.train(was_training)
    return correct / len(data)


def base_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in backbone.named_parameters()}


def scaling_curve(
    backbone: nn.Module,
    task: Task,
    delta: Mapping[str, torch.Tensor],
    scales: Sequence[float],
    split: str = "test",
) -> list[float]:
    """acc(s) of W0 + s·ΔW for each s (on the backbone's device)."""
    w0 = base_state(backbone)
    return [accuracy(backbone, task, split, apply_delta(w0, delta, s)) for s in scales]
