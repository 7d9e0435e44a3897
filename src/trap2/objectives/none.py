"""Plain fine-tuning: J = L(W0 + ΔW). The unprotected baseline."""

from __future__ import annotations

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.base import Loss, LossFn, StepStats
from trap2.scaling import ScaledModel


class PlainObjective:
    name = "none"

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg

    def backward(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        gen: torch.Generator,
    ) -> StepStats:
        loss = loss_fn(model(x), y)
        loss.backward()
        value = float(loss.detach())
        return StepStats(loss=value, nominal=value)
