"""Per-unit scales: W0 + Σ_u s_u·ΔW_u, one s_u per LoRA layer (full fine-tuning: per tensor), each
from U[s_min, s_max] (``law='log'``: uniform in log s) — what a layer-wise coefficient search
(AdaMerging, distilled per-layer coefficients) can pick."""

from __future__ import annotations

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.operators.base import Draw, operator, sample_range
from trap2.scaling import Scale, Unit


@operator(
    "layer_scale",
    summary="one scale s_u per LoRA layer / per tensor, each over [s_min, s_max]",
    stands_for="layer-wise coefficients: AdaMerging, ProDistill-like searches",
    cost="one forward and backward, as the paper",
)
def layer_scale(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    scales = sample_range(cfg, len(units), gen)
    mean = sum(scales) / len(scales) if scales else 1.0
    return Draw("layer_scale", mean, {u.name: Scale(s) for u, s in zip(units, scales, strict=True)})
