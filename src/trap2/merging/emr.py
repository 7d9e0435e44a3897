"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024):
Elect one unified update, then give each task a Mask and a Rescaler of it,

    γ = sign(Σ_t τ_t),   M_t = [τ_t ⊙ γ > 0],   τ_uni = γ ⊙ max_t |M_t ⊙ τ_t|,
    λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|,   τ̂_t = λ_t · M_t ⊙ τ_uni.

The merge is per task: task t is evaluated at W0 + τ̂_t (times the attacker's global c), so the kernel
returns the τ̂_t stacked, (T, ...), and the evaluation gives each task its own parameters. An entry whose
sum is exactly zero elects no sign (nothing kept there). ``scope='tensor'`` computes λ_t per tensor (one
per task and tensor); ``scope='model'`` one λ_t per task over the whole update, as the public code does
it (Σ over tensors of mean|τ_t| over Σ of mean|M_t ⊙ τ_uni|; computed by ``merge_updates`` with
:func:`model_rescalers` and passed in as ``rescalers``; full space only). With one member,
γ ⊙ |τ| = τ, M = [τ ≠ 0] and λ = 1 in either scope: the member comes back as it is.
"""

from __future__ import annotations

import torch

from trap2.merging.registry import HParam, merge_method


def elect(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) deltas -> the unified update τ_uni (...) and the masks M_t (T, ...)."""
    sign = torch.sign(deltas.sum(0))
    masks = deltas * sign > 0
    return sign * (deltas.abs() * masks).amax(0), masks


def _masked(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) deltas in float64 and their M_t ⊙ τ_uni."""
    stacked = torch.stack([d.to(torch.float64) for d in deltas])
    unified, masks = elect(stacked)
    return stacked, unified * masks


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def model_rescalers(members: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    """scope='model': one λ_t per member over all its tensors (each tensor elected over the members
    that hold it), as the public code sums per-tensor means."""
    num = torch.zeros(len(members), dtype=torch.float64)
    den = torch.zeros(len(members), dtype=torch.float64)
    for name in dict.fromkeys(n for m in members for n in m):
        idx = [i for i, m in enumerate(members) if name in m]
        stacked, per_task = _masked([members[i][name] for i in idx])
        for j, i in enumerate(idx):
            num[i] += stacked[j].abs().mean()
            den[i] += per_task[j].abs().mean()
    return {"rescalers": [float(v) for v in _ratio(num, den)]}


@merge_method(
    "emr",
    summary="elected unified update with a per-task mask and rescaler (one model per task)",
    reference="Huang et al., NeurIPS 2024, arXiv:2405.17461",
    hparams={
        "scope": HParam(
            "tensor",
            "rescale per 'tensor' or once over the whole 'model' (the public code's)",
            lambda v: v in ("tensor", "model"),
            "'tensor' or 'model'",
        ),
        "rescalers": HParam(
            None,
            "per-task rescalers λ_t (set by merge_updates for scope='model')",
            lambda v: v is None or isinstance(v, (list, tuple)),
            "null or a list",
        ),
    },
    per_task=True,
    model_scope=model_rescalers,
)
def emr(deltas: list[torch.Tensor], scope: str, rescalers: list[float] | None) -> torch.Tensor:
    stacked, per_task = _masked(deltas)  # (T, ...) each
    if rescalers is not None:
        rescale = torch.tensor(rescalers, dtype=torch.float64, device=stacked.device)
    else:
        dims = tuple(range(1, stacked.dim()))
        num = stacked.abs().sum(dims) if dims else stacked.abs()  # (T,)
        den = per_task.abs().sum(dims) if dims else per_task.abs()
        rescale = _ratio(num, den)
    return (rescale.reshape(-1, *[1] * (stacked.dim() - 1)) * per_task).to(deltas[0].dtype)
