"""Spectral reweighting of each unit's ΔW = U·diag(σ)·Vᵀ, times a global scale s over [s_min, s_max]:

- ``spectral`` (TSV, CART's low-rank step, KnOTS truncation): the top-k fraction of directions kept,
  k ~ U[keep_min, keep_max], the others scaled by t ~ U[0, 1];
- ``isotropic`` (Iso-C/CTS, WUDI-like flattening): every direction at the mean singular value.

First order in the spectrum: U and V are those of the current ΔW, taken as constants (no gradient
through the singular vectors, which is undefined where singular values repeat); the singular values
σ_i = u_iᵀ·ΔW·v_i carry the gradient (exact for distinct σ_i). On LoRA the SVD is that of the r × r
core after QR, B = Q_B·R_B, Aᵀ = Q_A·R_A, SVD of R_B·R_Aᵀ, and the result stays in factor form, so a
draw costs O((out + in)·r²). Full fine-tuning reweights every tensor of two or more dimensions
(reshaped to (out, −1)) by its SVD; the others are scaled by s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trap2.config import ObjectiveConfig
from trap2.objectives.operators.base import Draw, operator, sample_range, uniform
from trap2.scaling import Dense, Factors, Scale, Transform, Unit

Reweight = Callable[[torch.Tensor], torch.Tensor]  # (k,) singular values, descending -> new values


@torch.no_grad()
def lora_singular_vectors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, k), V (in, k) of ΔW ∝ B·A, B (out, r), A (r, in), from the QR factors and the SVD of the
    r × r core (singular values descending). Detached."""
    qb, rb = torch.linalg.qr(b.double())  # (out, r'), (r', r)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, r''), (r'', r)
    uc, _sc, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return (qb @ uc).to(b.dtype), (qa @ vch.T).to(a.dtype)


@torch.no_grad()
def dense_singular_vectors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m, k), V (n, k) of a 2-D ΔW (singular values descending). Detached."""
    u, _s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u.to(delta.dtype), vh.T.to(delta.dtype)


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values lie above rounding (float32's), relative to the largest."""
    if sigma.numel() == 0:
        return 0
    top = float(sigma.detach().abs().max())
    tol = top * max(shape) * torch.finfo(torch.float32).eps
    return int((sigma.detach().abs() > tol).sum()) if top > 0 else 0


def truncate(keep: float, tail: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """σ -> the top ⌈keep·rank⌉ kept, the rest times ``tail``."""

    def f(sigma: torch.Tensor, rank: int) -> torch.Tensor:
        n_keep = max(1, math.ceil(keep * rank))
        w = torch.full_like(sigma, tail)
        w[:n_keep] = 1.0
        return sigma * w

    return f


def flatten(sigma: torch.Tensor, rank: int) -> torch.Tensor:
    """σ -> every one of the top ``rank`` directions at their mean singular value, the rest 0."""
    out = torch.zeros_like(sigma)
    if rank:
        out[:rank] = sigma[:rank].mean()
    return out


def reweight_lora(
    f: Callable[[torch.Tensor, int], torch.Tensor], s: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(c·B, A) -> (P, Q) with P·Q = s·U·diag(f(σ))·Vᵀ, U and V from the QR + core SVD."""

    def fn(cb: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = lora_singular_vectors(cb, a)  # (out, k), (in, k)
        sigma = ((u.T @ cb) * (a @ v).T).sum(1)  # σ_i = u_iᵀ·(c·B)·(A·v_i), (k,)
        new = f(sigma, numerical_rank(sigma, (cb.shape[0], a.shape[1])))
        return u * (s * new), v.T

    return fn


def reweight_dense(
    f: Callable[[torch.Tensor, int], torch.Tensor], s: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """ΔW -> s·U·diag(f(σ))·Vᵀ (ΔW reshaped to (out, −1) and back)."""

    def fn(delta: torch.Tensor) -> torch.Tensor:
        m = delta.reshape(delta.shape[0], -1)  # (out, in·…)
        u, v = dense_singular_vectors(m)
        sigma = ((u.T @ m) * v.T).sum(1)  # σ_i = u_iᵀ·ΔW·v_i, (k,)
        new = f(sigma, numerical_rank(sigma, tuple(m.shape)))
        return (s * (u * new) @ v.T).reshape(delta.shape)

    return fn


def _transforms(
    units: list[Unit], f: Callable[[torch.Tensor, int], torch.Tensor], s: float
) -> dict[str, Transform]:
    out: dict[str, Transform] = {}
    for u in units:
        if u.kind == "lora":
            out[u.name] = Factors(reweight_lora(f, s)) if u.b is not None else Scale(s)
        else:
            out[u.name] = Dense(reweight_dense(f, s)) if u.w.dim() >= 2 else Scale(s)
    return out


@operator(
    "spectral",
    summary="keep each unit's top-k fraction of singular directions, scale the tail by t ~ U[0, 1], times s",
    stands_for="TSV, CART, KnOTS/Core truncation",
    cost="one forward and backward; LoRA: QR + an r × r SVD per layer; full: an SVD per matrix",
)
def spectral(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    keep = uniform(gen, cfg.keep_min, cfg.keep_max)
    tail = uniform(gen, 0.0, 1.0)
    (s,) = sample_range(cfg, 1, gen)
    return Draw("spectral", s, _transforms(units, truncate(keep, tail), s))


@operator(
    "isotropic",
    summary="flatten each unit's spectrum to its mean singular value, times s",
    stands_for="Iso-C, Iso-CTS, WUDI-like whitening",
    cost="as 'spectral'",
)
def isotropic(cfg: ObjectiveConfig, units: list[Unit], gen: torch.Generator) -> Draw:
    (s,) = sample_range(cfg, 1, gen)
    return Draw("isotropic", s, _transforms(units, flatten, s))
