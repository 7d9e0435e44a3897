"""Per-entry trims of each unit's ΔW, times a global scale s over [s_min, s_max]:

- ``trim`` (TIES, EMR): keep the top-k fraction of entries by magnitude, k ~ U[keep_min, keep_max];
- ``drop`` (DARE): keep each entry with probability k and rescale the kept ones by 1/k.

The masks are constants of the draw (no gradient through which entries are kept); the kept entries
carry the gradient. On LoRA the dense ΔW of each layer is formed (out × in per layer).
"""

from __future__ import annotations

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.operators.base import Draw, operator, sample_range, uniform
from trap2.scaling import Dense, Unit


def topk_mask(delta: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of the round(keep·n) largest |entries| (at least one; ties at the threshold kept)."""
    flat = delta.detach().abs().flatten()
    n_keep = min(flat.numel(), max(1, round(flat.numel() * keep)))
    threshold = torch.topk(flat, n_keep, sorted=False).values.min()
    return delta.detach().abs() >= threshold


def trim(delta: torch.Tensor, keep: float) -> torch.Tensor:
    """ΔW with all but its top-``keep`` fraction of entries (by magnitude) set to 0."""
    return delta * topk_mask(delta, keep)


def drop(delta: torch.Tensor, keep: float, seed: int) -> torch.Tensor:
    """DARE: each entry kept with probability ``keep`` (the mask drawn from ``seed``), kept ones / keep."""
    gen = torch.Generator(device=delta.device).manual_seed(seed)
    mask = torch.rand(delta.shape, generator=gen, device=delta.device) < keep
    return delta * mask / keep


@operator(
    "trim",
    summary="keep each unit's top-k fraction of entries by magnitude, times s",
    stands_for="TIES, EMR, the trim of DARE+TIES",
    cost="one forward and backward; a top-k over each unit's entries (LoRA: its dense ΔW)",
)
def trim_op(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    keep = uniform(gen, cfg.keep_min, cfg.keep_max)
    (s,) = sample_range(cfg, 1, gen)
    return Draw("trim", s, {u.name: Dense(lambda d, k=keep, s=s: s * trim(d, k)) for u in units})


@operator(
    "drop",
    summary="drop each entry with probability 1 − k, rescale the kept ones by 1/k, times s",
    stands_for="DARE",
    cost="one forward and backward; a random mask per unit (LoRA: on its dense ΔW)",
)
def drop_op(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    keep = uniform(gen, cfg.keep_min, cfg.keep_max)
    (s,) = sample_range(cfg, 1, gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return Draw(
        "drop",
        s,
        {u.name: Dense(lambda d, k=keep, s=s, i=i: s * drop(d, k, seed + i)) for i, u in enumerate(units)},
    )
