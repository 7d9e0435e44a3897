"""Registered off-nominal operators for the hardened Trap² objective (``objective.operators``).

Each step, each of the ``n_samples`` off-nominal draws picks an operator of the family uniformly and
draws its parameters; a draw whose result lies within δ of the update, ‖op(ΔW) − ΔW‖/‖ΔW‖ < δ (the
paper's band |s − 1| < δ generalised), is rejected and drawn again. The family ``scale`` alone is the
paper's objective, draw for draw.
"""

from __future__ import annotations

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.operators.base import Draw, OperatorSpec, relative_distance, squared_norms
from trap2.objectives.operators.layer_scale import layer_scale
from trap2.objectives.operators.scale import scale
from trap2.objectives.operators.spectral import isotropic, spectral
from trap2.objectives.operators.trim import drop_op, trim_op
from trap2.registry import Registry
from trap2.scaling import ScaledModel

OPERATORS: Registry[OperatorSpec] = Registry("operator")
for _spec in (scale, layer_scale, trim_op, drop_op, spectral, isotropic):
    OPERATORS.register(_spec.name, _spec)

MAX_TRIES = 20  # draws too close to the identity in a row before falling back to the paper's s·ΔW


def family(cfg: ObjectiveConfig) -> list[str]:
    """The operator names of ``cfg.operators`` (comma-separated), in order."""
    return [name.strip() for name in cfg.operators.split(",")]


def draw_operators(cfg: ObjectiveConfig, model: ScaledModel, n: int, gen: torch.Generator) -> list[Draw]:
    """``n`` off-nominal draws for this step. The family ``scale`` alone draws exactly the paper's
    scales (``sample_scales(cfg, n, gen)``); otherwise each draw picks an operator uniformly, rejects
    results within δ of ΔW, and after ``MAX_TRIES`` such rejections falls back to the paper's s·ΔW."""
    names = family(cfg)
    if names == ["scale"]:
        from trap2.objectives.trap2 import sample_scales

        return [Draw("scale", s) for s in sample_scales(cfg, n, gen)]
    units = model.units()
    norms = squared_norms(units)
    draws = []
    for _ in range(n):
        for _try in range(MAX_TRIES):
            pick = names[int(torch.randint(len(names), (1,), generator=gen))]
            d = OPERATORS.get(pick).draw(cfg, units, gen)
            if relative_distance(units, d, norms) >= cfg.delta * (1 - 1e-9) or sum(norms) == 0.0:
                break
        else:
            d = scale.draw(cfg, units, gen)
        draws.append(d)
    return draws


__all__ = ["OPERATORS", "Draw", "OperatorSpec", "draw_operators", "family", "relative_distance"]
