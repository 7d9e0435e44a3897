"""Accuracy of a backbone, possibly at W0 + c·ΔW, on a task's split; and the scaling curve acc(s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from trap2.suites.base import Split, Task
from trap2.updates import apply_delta


@torch.no_grad()
def accuracy(
    backbone: nn.Module,
    task: Task,
    split: Split | str = "test",
    params: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 2048,
) -> float:
    """Fraction correct of ``task.head(backbone(x))``; ``params`` overrides backbone parameters."""
    data = task.split(split) if isinstance(split, str) else split
    if task.evaluate is not None:  # the task's own metric (e.g. exact match of generated answers)
        return task.evaluate(backbone, data, params)
    device = next(backbone.parameters()).device
    head = task.head.to(device)
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
    """acc(s) of W0 + s·ΔW for each s."""
    w0 = base_state(backbone)
    return [accuracy(backbone, task, split, apply_delta(w0, delta, s)) for s in scales]
