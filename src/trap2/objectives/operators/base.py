"""What an operator is, how its draws are checked against the identity, and the shared scale law.

An operator stands for what a merge or an attacker does to a released update ΔW other than the
paper's uniform rescaling: per-layer coefficients, per-entry trims, spectral reweighting. One draw
gives every unit of the update (a LoRA layer's adapter, a fully trained tensor:
:class:`trap2.scaling.Unit`) a :data:`trap2.scaling.Transform`; the trap term is then measured at
W0 + op(ΔW) instead of W0 + s·ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trap2.config import ObjectiveConfig
from trap2.scaling import Dense, Factors, Scale, Transform, Unit


@dataclass(frozen=True)
class Draw:
    """One off-nominal operator: ``transforms`` per unit name (None: the paper's global s·ΔW, run by
    ``ScaledModel.scale``), and the scale ``s`` whose w(s) weighs its trap term."""

    operator: str
    s: float
    transforms: Mapping[str, Transform] | None = None


DrawFn = Callable[[ObjectiveConfig, list[Unit], torch.Generator], Draw]


@dataclass(frozen=True)
class OperatorSpec:
    """A registered operator: its name, what it does, the merges it stands for, its cost per draw."""

    name: str
    summary: str
    stands_for: str
    cost: str
    draw: DrawFn


def operator(name: str, summary: str, stands_for: str, cost: str) -> Callable[[DrawFn], OperatorSpec]:
    """Turn a draw function into a frozen :class:`OperatorSpec` (register it in ``OPERATORS``)."""

    def wrap(fn: DrawFn) -> OperatorSpec:
        return OperatorSpec(name, summary, stands_for, cost, fn)

    return wrap


def uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    """One draw from U[lo, hi] (float64)."""
    return lo + (hi - lo) * float(torch.rand(1, generator=gen, dtype=torch.float64))


def sample_range(cfg: ObjectiveConfig, n: int, gen: torch.Generator) -> list[float]:
    """n scales over the whole [s_min, s_max] (no band: the identity rule rejects draws too close to
    ΔW as a whole), uniform or, with ``law='log'``, uniform in log s."""
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    if cfg.law == "log":
        a, b = math.log(cfg.s_min), math.log(cfg.s_max)
        return [math.exp(a + (b - a) * v) for v in u]
    return [cfg.s_min + (cfg.s_max - cfg.s_min) * v for v in u]


def _gram_sq_norm(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """‖P·Q‖²_F from the factors, P (m, k), Q (k, n): tr((PᵀP)(QQᵀ)), nothing of size m × n formed."""
    return ((p.T @ p) * (q @ q.T)).sum()


@torch.no_grad()
def squared_norms(units: list[Unit]) -> list[float]:
    """‖ΔW‖²_F of every unit (LoRA units from their factors)."""
    out = []
    for u in units:
        if u.kind == "lora" and u.b is not None:
            out.append(float(_gram_sq_norm(u.scaling * u.b.double(), u.a.double())))
        elif u.kind == "lora":
            out.append(0.0)  # a non-Linear adapter: left out of the distance
        else:
            out.append(float((u.w.double() - u.w0.to(u.w.device).double()).pow(2).sum()))
    return out


@torch.no_grad()
def relative_distance(units: list[Unit], draw: Draw, norms: list[float] | None = None) -> float:
    """‖op(ΔW) − ΔW‖ / ‖ΔW‖ over the whole update (every unit's Frobenius norm squared, summed);
    0 for a zero update. For the paper's s·ΔW it is |s − 1|."""
    norms = squared_norms(units) if norms is None else norms
    total = sum(norms)
    if total == 0.0:
        return 0.0
    if draw.transforms is None:
        return abs(draw.s - 1.0)
    diff = 0.0
    for u, norm in zip(units, norms, strict=True):
        t = draw.transforms.get(u.name)
        if t is None or norm == 0.0:
            continue
        if isinstance(t, Scale):
            diff += (t.s - 1.0) ** 2 * norm
        elif isinstance(t, Factors):
            p, q = t.fn(u.scaling * u.b, u.a)  # op(ΔW) = P·Q; ΔW = (c·B)·A: stack to one product
            p_all = torch.cat([p.double(), -u.scaling * u.b.double()], dim=1)
            q_all = torch.cat([q.double(), u.a.double()], dim=0)
            diff += float(_gram_sq_norm(p_all, q_all))
        elif isinstance(t, Dense):
            d = u.delta()
            diff += float((t.fn(d).double() - d.double()).pow(2).sum())
    return math.sqrt(diff / total)
