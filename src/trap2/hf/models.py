"""Glue between trap2's suites and the ``Trainer``: a backbone with a frozen head that returns
``{"loss", "logits"}``, and a suite task's split as a list of examples.

The head is frozen and is not part of the released update (like CLIP's zero-shot text heads), so
LoRA never targets it and full fine-tuning leaves it out of ΔW.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trap2.suites.base import Task


class HeadedModel(nn.Module):
    """``backbone`` (a transformers model or any module) followed by a frozen ``head``.

    ``features``: how to read the features from the backbone's output — the name of an output field
    (``"pooler_output"``, ``"last_hidden_state"`` → first token), or ``None`` when the backbone returns
    the feature tensor itself.
    """

    accepts_loss_kwargs = False  # the loss is a per-batch mean: the Trainer scales it for accumulation

    def __init__(self, backbone: nn.Module, head: nn.Module, features: str | None = "pooler_output") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head.requires_grad_(False)
        self.features = features

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        inputs.pop("num_items_in_batch", None)
        if self.features is None:
            if len(inputs) != 1:
                raise TypeError(
                    f"{type(self.backbone).__name__} takes one input tensor, got {', '.join(inputs)}"
                )
            (x,) = inputs.values()
            feats = self.backbone(x)
        else:
            out = self.backbone(**inputs)
            feats = out[self.features]
            if self.features == "last_hidden_state":
                feats = feats[:, 0]
        logits = self.head(feats)
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = F.cross_entropy(logits, labels)
        return result


def task_model(backbone: nn.Module, task: Task) -> HeadedModel:
    """A digits-style suite task as a Trainer model: the suite backbone and the task's frozen head."""
    return HeadedModel(backbone, task.head, features=None)


def task_examples(task: Task, split: str = "train") -> list[dict[str, torch.Tensor]]:
    """The split as ``[{"pixel_values": x, "labels": y}, ...]`` (the Trainer's default collator stacks them)."""
    part = task.split(split)
    return [{"pixel_values": x, "labels": y} for x, y in zip(part.x, part.y, strict=True)]
