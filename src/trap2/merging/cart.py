"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging", 2024): the mean of the task
deltas plus β times the sum of each task's rank-⌈ρ·min(m, n)⌉ residual from that mean,

    τ = τ̄ + β Σ_t SVD_r(τ_t − τ̄),   τ̄ = mean_t τ_t.

The paper keeps τ̄ at weight 1 and picks β (its λ, "prior" in the public code: 2.0 for ViT-B/32 × 8)
on validation; the attack scans c·τ on top, so with β searched over its grid the attacker's family
contains the paper's (c = 1). Non-matrix tensors are averaged (their residuals sum to zero).
"""

from __future__ import annotations

import math

import torch

from trap2.merging.registry import HParam, merge_method


def low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@merge_method(
    "cart",
    summary="mean + β · Σ rank-ρ SVD of each residual from the mean",
    reference="Choi et al., 2024, arXiv:2412.12153",
    hparams={
        "rho": HParam(
            0.08,
            "rank ratio ρ of the residuals",
            lambda v: 0 < v <= 1,
            "(0, 1]",
            grid=(0.04, 0.08, 0.16, 0.32),
        ),
        "beta": HParam(
            0.1,
            "weight β of the residual sum (the paper's λ; every attack searches it on validation)",
            lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
            "a finite number >= 0",
            grid=(0.1, 0.2, 0.5, 1.0, 1.5, 2.0),
            searched=True,
        ),
    },
)
def cart(deltas: list[torch.Tensor], rho: float, beta: float) -> torch.Tensor:
    stacked = torch.stack([d.to(torch.float64) for d in deltas])
    mean = stacked.mean(0)
    if deltas[0].dim() < 2:
        return mean.to(deltas[0].dtype)
    shape = deltas[0].shape
    flat_mean = mean.reshape(shape[0], -1)
    rank = max(1, math.ceil(rho * min(flat_mean.shape)))
    residual = sum(low_rank(d.reshape(shape[0], -1) - flat_mean, rank) for d in stacked)
    return (flat_mean + beta * residual).reshape(shape).to(deltas[0].dtype)
