"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025): merge in the singular basis of the summed deltas with an isotropic
(flat) spectrum.

- ``iso_c``: Σ_t τ_t = U·S·Vᵀ  →  α·σ̄·U·Vᵀ, σ̄ = mean(S) (every direction of the sum at the same scale).
- ``iso_cts``: the top ⌊ρ·k⌋ directions of the sum (k = min(m, n), the common subspace; the share is
  adjusted so the rest splits evenly) plus, for each task, the top (k − k_c)/T directions of its own τ_t
  projected off the common subspace, τ_t − U_c·U_cᵀ·τ_t; the concatenated U's and V's are replaced by
  their polar factors and every direction gets the mean of the concatenated singular values.

Directions below rounding (a sum of LoRA updates has rank ≤ Σ r_t) carry no signal, so they are left
out before the spectrum is flattened (the public code flattens over all min(m, n), which on a
rank-deficient sum lifts noise directions to the mean); on full-rank inputs both agree. α scales the
result (the paper tunes it on validation; it is linear, so the attacker's coefficient c covers it too).
Non-matrix tensors are averaged. One member does not come back as it is: its spectrum is flattened.
"""

from __future__ import annotations

import torch

from trap2.merging.registry import HParam, merge_method
from trap2.merging.spaces import _rank
from trap2.merging.tsv import polar_factor

ALPHA = HParam(
    1.0,
    "scale α of the isotropic merge (the paper's, tuned on validation)",
    lambda v: isinstance(v, (int, float)) and v > 0,
    "a number > 0",
    grid=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
)


RESIDUAL_SLACK = 10.0


def _svd(
    m: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``m`` (float64) cut to its numerical rank at the precision of the input ``dtype``, relative
    to ``scale`` (default: m's own top singular value; a residual is measured against its source)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if scale is None:
        r = _rank(s, tuple(m.shape), dtype)
    else:
        # x RESIDUAL_SLACK: a residual m − P·m of a direction inside P's span is rounding error of about
        # max(shape)·ε·‖m‖ itself (measured: 21e-15 against a bound of 20e-15 on an AMD EPYC, float64),
        # and a noise direction let through is lifted to the mean singular value
        tol = (
            scale
            * max(m.shape)
            * min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
            * RESIDUAL_SLACK
        )
        r = int((s > tol).sum())
    return u[:, :r], s[:r], vh[:r]


def _mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([d.to(torch.float64) for d in deltas]).mean(0).to(deltas[0].dtype)


@merge_method(
    "iso_c",
    summary="SVD of the summed deltas with its spectrum flattened to the mean (Iso-C)",
    reference="Marczak et al., ICML 2025, arXiv:2502.04959",
    hparams={"alpha": ALPHA},
    no_identity=True,
)
def iso_c(deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    if deltas[0].dim() < 2:
        return _mean(deltas)
    shape = deltas[0].shape
    total = sum(d.reshape(shape[0], -1).to(torch.float64) for d in deltas)  # (m, n')
    u, s, vh = _svd(total, deltas[0].dtype)
    return (alpha * s.mean() * u @ vh).reshape(shape).to(deltas[0].dtype)


def split_rank(k: int, common: float, tasks: int) -> tuple[int, int]:
    """(k_c, per task): the common subspace's size ⌊ρ·k⌋, moved so that k − k_c splits evenly into
    ``tasks`` blocks of the nearest whole size (as the public code rounds it), never beyond k."""
    per = round((k - int(k * common)) / tasks)
    per = min(per, k // tasks)
    return k - per * tasks, per


@merge_method(
    "iso_cts",
    summary="common top directions of the sum + each task's own directions off them, orthogonalised, "
    "flat spectrum (Iso-CTS)",
    reference="Marczak et al., ICML 2025, arXiv:2502.04959",
    hparams={
        "common": HParam(
            0.8,
            "share ρ of the rank min(m, n) given to the common subspace",
            lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
            "[0, 1]",
            grid=(0.5, 0.6, 0.7, 0.8, 0.9),
        ),
        "alpha": ALPHA,
    },
    no_identity=True,
)
def iso_cts(deltas: list[torch.Tensor], common: float, alpha: float) -> torch.Tensor:
    if deltas[0].dim() < 2:
        return _mean(deltas)
    shape, dtype = deltas[0].shape, deltas[0].dtype
    mats = [d.reshape(shape[0], -1).to(torch.float64) for d in deltas]  # (m, n') each
    k_common, per = split_rank(min(mats[0].shape), common, len(mats))
    u, s, vh = _svd(sum(mats), dtype)
    us, ss, vhs = [u[:, :k_common]], [s[:k_common]], [vh[:k_common]]
    proj = us[0] @ us[0].T  # (m, m): onto the common subspace
    for m in mats:
        if per == 0:
            break
        # the task's own directions off the common subspace (none left when it lies inside it)
        ut, st, vht = _svd(m - proj @ m, dtype, scale=torch.linalg.matrix_norm(m, 2))
        us.append(ut[:, :per])
        ss.append(st[:per])
        vhs.append(vht[:per])
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    merged = alpha * s_cat.mean() * polar_factor(u_cat) @ polar_factor(vh_cat.T).T
    return merged.reshape(shape).to(dtype)
