"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): merge = Σ_i ΔW_i."""

from __future__ import annotations

import torch

from trap2.merging.registry import merge_method


@merge_method(
    "ta",
    summary="sum of the task deltas (the global coefficient c scales the sum)",
    reference="Ilharco et al., ICLR 2023, arXiv:2212.04089",
)
def task_arithmetic(deltas: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([d.to(torch.float32) for d in deltas]).sum(0).to(deltas[0].dtype)
