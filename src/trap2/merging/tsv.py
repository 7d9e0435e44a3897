"""TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025): per task keep the top ⌊k/T⌋ singular triplets (k = min(m, n)), concatenate the U's, Σ's
and V's, replace the concatenated U and V by their polar factors (the nearest matrices with orthonormal
columns), and return U⊥·diag(Σ)·V⊥ᵀ, all in float64. Non-matrix tensors are averaged.

In KnOTS space the inputs are the task blocks V_i of one orthonormal basis; when the tasks span
independent subspaces every V_i has singular values exactly 1, so keeping ⌊k/T⌋ of them from a task of
higher rank picks among equals and depends on the basis LAPACK returns. Results are order-independent
whenever each task's rank fits its budget.
"""

from __future__ import annotations

import torch

from trap2.merging.registry import HParam, merge_method


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal-column factor of ``m`` (P·Qᵀ from m = P·S·Qᵀ)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


@merge_method(
    "tsv",
    summary="per-task top singular triplets, orthogonalised and recombined (TSV-M)",
    reference="Gargiulo et al., CVPR 2025, arXiv:2412.00081",
    hparams={
        "fraction": HParam(
            1.0, "share of the rank budget min(m, n) split across the tasks", lambda v: 0 < v <= 1, "(0, 1]"
        ),
    },
)
def tsv(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    if deltas[0].dim() < 2:
        return torch.stack([d.to(torch.float64) for d in deltas]).mean(0).to(deltas[0].dtype)
    shape = deltas[0].shape
    mats = [d.reshape(shape[0], -1).to(torch.float64) for d in deltas]  # conv kernels as (out, in·kh·kw)
    per_task = max(1, int(fraction * min(mats[0].shape) // len(mats)))
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        us.append(u[:, :per_task])
        ss.append(s[:per_task])
        vs.append(vh[:per_task].T)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    merged = polar_factor(u_cat) @ torch.diag(s_cat) @ polar_factor(v_cat).T
    return merged.reshape(shape).to(deltas[0].dtype)
