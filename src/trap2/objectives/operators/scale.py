"""The paper's operator (Trap², Jang et al., ICML 2026, Eq. 3): one scale for the whole update,
W0 + s·ΔW, s ~ U([s_min, 1−δ] ∪ [1+δ, s_max]) (``law='log'``: uniform in log s)."""

from __future__ import annotations

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.operators.base import Draw, operator
from trap2.scaling import Unit


@operator(
    "scale",
    summary="one scale s for the whole update: W0 + s·ΔW (the paper's)",
    stands_for="task arithmetic, TIES/TSV/CART's global coefficient",
    cost="one forward and backward, as the paper",
)
def scale(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    from trap2.objectives.trap2 import sample_scales

    (s,) = sample_scales(cfg, 1, gen)
    return Draw("scale", s)
