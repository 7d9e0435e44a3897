"""Trap² (Jang et al., ICML 2026): J = L(W0+ΔW) − λ·E_s[w(s)·L(W0+s·ΔW)].

s ~ U([s_min, 1−δ] ∪ [1+δ, s_max]) (length-weighted over the two intervals, the same law as the
paper's rejection sampling), w(s) ∈ {1/s, 1/√s, 1}. Two forward and two backward passes per step on the
same mini-batch with the same dropout mask; the gradients accumulate. With ``bound = τ`` the off-nominal
loss enters as τ·tanh(L/τ), which keeps −λ·w·L from running away once the trap has formed.
"""

from __future__ import annotations

import math

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.base import LossFn, StepStats, same_random_draws
from trap2.scaling import ScaledModel


def sample_scales(cfg: ObjectiveConfig, n: int, gen: torch.Generator) -> list[float]:
    """n draws from U([s_min, 1−δ] ∪ [1+δ, s_max])."""
    low = 1.0 - cfg.delta - cfg.s_min
    high = cfg.s_max - 1.0 - cfg.delta
    u = torch.rand(n, generator=gen, dtype=torch.float64) * (low + high)
    return [cfg.s_min + v if v < low else 1.0 + cfg.delta + (v - low) for v in u.tolist()]


def scale_weight(kind: str, s: float) -> float:
    if kind == "inv":
        return 1.0 / s
    if kind == "inv_sqrt":
        return 1.0 / math.sqrt(s)
    return 1.0


def bounded(loss: torch.Tensor, tau: float | None) -> torch.Tensor:
    return loss if tau is None else tau * torch.tanh(loss / tau)


class Trap2Objective:
    name = "trap2"
    sign = -1.0  # J = L(1) − λ·w(s)·L(s): accurate at s = 1, wrong elsewhere

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg

    def backward(
        self, model: ScaledModel, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, gen: torch.Generator
    ) -> StepStats:
        cfg = self.cfg
        scales = sample_scales(cfg, cfg.n_samples, gen)
        with same_random_draws(x.device) as replay:
            nominal = loss_fn(model(x, 1.0), y)
            nominal.backward()
            j = float(nominal.detach())
            off_values = []
            for s in scales:
                replay()
                off = loss_fn(model(x, s), y)
                term = (self.sign * cfg.lam * scale_weight(cfg.weight, s) / len(scales)) * bounded(
                    off, cfg.bound
                )
                term.backward()
                j += float(term.detach())
                off_values.append(float(off.detach()))
        return StepStats(
            loss=j,
            nominal=float(nominal.detach()),
            off_nominal=sum(off_values) / len(off_values),
            scales=scales,
        )


class FlattenObjective(Trap2Objective):
    """The attacker's inverse of Trap²: J = L(1) + λ·w(s)·L(s), accurate at every scale. Used to
    "un-trap" a released update (``trap2.attacks.untrap``) before merging it."""

    name = "flatten"
    sign = 1.0
