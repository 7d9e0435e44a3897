"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024):
Elect one unified update, then give each task a Mask and a Rescaler of it,

    γ = sign(Σ_t τ_t),   M_t = [τ_t ⊙ γ > 0],   τ_uni = γ ⊙ max_t |M_t ⊙ τ_t|,
    λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|,   τ̂_t = λ_t · M_t ⊙ τ_uni.

The merge is per task: task t is evaluated at W0 + τ̂_t (times the attacker's global c), so the kernel
returns the τ̂_t stacked, (T, ...), and the evaluation gives each task its own parameters. An entry whose
sum is exactly zero elects no sign (nothing kept there). The rescaler is computed per tensor here (one
λ_t per task and tensor); the public code sums per-tensor means over the whole model for one λ_t per
task. With one member, γ ⊙ |τ| = τ, M = [τ ≠ 0] and λ = 1: the member comes back as it is.
"""

from __future__ import annotations

import torch

from trap2.merging.registry import merge_method


def elect(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) deltas -> the unified update τ_uni (...) and the masks M_t (T, ...)."""
    sign = torch.sign(deltas.sum(0))
    masks = deltas * sign > 0
    return sign * (deltas.abs() * masks).amax(0), masks


@merge_method(
    "emr",
    summary="elected unified update with a per-task mask and rescaler (one model per task)",
    reference="Huang et al., NeurIPS 2024, arXiv:2405.17461",
    per_task=True,
)
def emr(deltas: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack([d.to(torch.float64) for d in deltas])  # (T, ...)
    unified, masks = elect(stacked)
    per_task = unified * masks  # (T, ...): M_t ⊙ τ_uni
    dims = tuple(range(1, stacked.dim()))
    num = stacked.abs().sum(dims) if dims else stacked.abs()  # (T,)
    den = per_task.abs().sum(dims) if dims else per_task.abs()
    rescale = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return (rescale.reshape(-1, *[1] * len(dims)) * per_task).to(deltas[0].dtype)
