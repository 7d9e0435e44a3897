"""Merge spaces: how each tensor's task deltas are represented before a merge method runs.

- ``full``: the dense ΔW_i.
- ``knots`` (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): SVD of the
  column-stacked [ΔW_1 … ΔW_T] = U·S·[V_1 … V_T]ᵀ; the method merges the task-specific V_i and the
  result is U·S·V_mergedᵀ.
- ``core`` (LoRA only; "core space" merging, Panariello et al., 2025): reference bases from the SVD of
  the stacked B's and of the stacked A's; each task becomes a small core M_i = U_Bᵀ·B_i·A_i·V_A; the
  method merges the cores and the result is U_B·M·V_Aᵀ.

Task arithmetic gives the same result in every space (the bases span every member exactly); in full
space it concatenates LoRA factors, so TA of adapters is again an adapter (rank Σ r_i). Tensors
that are not matrices (biases, norms) are merged in full space. KnOTS and Core return low-rank deltas,
so a merge of LoRA adapters in those spaces is written back as a LoRA adapter. Branches of
``fan_in_fan_out`` layers (GPT-2 ``Conv1D``, which stores ΔWᵀ) are factored as ΔW = B·A (out, in), as PEFT
computes it, and come back ``fan_in_fan_out``, so the adapter has PEFT's shapes (A: (r, in)).

A ``per_task`` method's stacked result (T, ...) is mapped back slice by slice: the space then returns a
list with one delta per member, each in the same shared basis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trap2.errors import ConfigError
from trap2.merging.registry import MergeMethod
from trap2.registry import Registry
from trap2.updates import Delta, LowRank

SpaceFn = Callable[[MergeMethod, Sequence[Delta], dict[str, Any]], "Delta | list[Delta]"]
SPACES: Registry[SpaceFn] = Registry("merge space")


def _dense(d: Delta) -> torch.Tensor:
    return d.dense() if isinstance(d, LowRank) else d


def _rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Numerical rank (as numpy.linalg.matrix_rank) at the precision of the input data ``dtype``:
    directions below it are rounding noise with arbitrary singular vectors, which a method working on
    the factors (TSV, TIES) would otherwise treat as signal. Half-precision values are exact in the
    float32/float64 arithmetic here, so they are cut at float32's precision: bf16's eps·max(shape) would
    drop real directions (several % of the top singular value)."""
    if s.numel() == 0 or s[0] == 0:
        return 1
    tol = s[0] * max(shape) * min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return max(1, int((s > tol).sum()))


def _as_low_rank(b: torch.Tensor, a: torch.Tensor, like: torch.Tensor) -> Delta:
    """B (out, r) · A (r, in') as a LowRank shaped like ``like`` (conv kernels keep their dims); a tensor
    that no LoRA layer holds (a 3-D class token or position table) comes back dense, in its own shape."""
    b32, a32 = b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()
    if like.dim() == 4:
        return LowRank(a32.reshape(a32.shape[0], *like.shape[1:]), b32[:, :, None, None], 1.0)
    if like.dim() != 2:
        return (b32 @ a32).reshape(like.shape)
    return LowRank(a32, b32, 1.0)


def _each(
    method: MergeMethod, result: torch.Tensor, back: Callable[[torch.Tensor], Delta]
) -> Delta | list[Delta]:
    """``back(result)``; for a per-task method, one ``back`` per member's slice of the stacked result."""
    return [back(r) for r in result.unbind(0)] if method.per_task else back(result)


def merge_full(method: MergeMethod, members: Sequence[Delta], hp: dict[str, Any]) -> Delta | list[Delta]:
    if method.name == "ta" and _concatenable(members):
        # task arithmetic of LoRA branches is their concatenation: exact, and still a LoRA adapter
        a = torch.cat([d.A.to(torch.float32) * d.scaling for d in members], dim=0)  # (Σr, in[, kh, kw])
        b = torch.cat([d.B.to(torch.float32) for d in members], dim=1)  # (out, Σr[, 1, 1])
        return LowRank(a, b, 1.0, members[0].fan_in_fan_out)
    return _each(method, method([_dense(d) for d in members], **hp), lambda r: r)


def _concatenable(members: Sequence[Delta]) -> bool:
    return all(isinstance(d, LowRank) for d in members) and len({d.fan_in_fan_out for d in members}) == 1


def merge_knots(method: MergeMethod, members: Sequence[Delta], hp: dict[str, Any]) -> Delta | list[Delta]:
    fan = _fan_in_fan_out(members, "knots")
    dense = [_dense(d) for d in members]
    if dense[0].dim() < 2:
        return _each(method, method(dense, **hp), lambda r: r)
    if fan:  # GPT-2 Conv1D stores ΔWᵀ (in, out): factor ΔW (out, in), as PEFT's B·A is, and as Linear is
        dense = [d.T for d in dense]
    like = dense[0]
    mats = [d.reshape(like.shape[0], -1).to(torch.float64) for d in dense]  # (m, n') each
    n = mats[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False)  # (m, T·n')
    r = _rank(s, (mats[0].shape[0], n * len(mats)), like.dtype)
    v = vh[:r].T  # (T·n', r)
    per_task = [v[i * n : (i + 1) * n] for i in range(len(mats))]  # V_i: (n', r)

    def back(v_merged: torch.Tensor) -> Delta:
        out = _as_low_rank(u[:, :r] * s[:r], v_merged.T, like)
        return LowRank(out.A, out.B, out.scaling, True) if fan else out

    return _each(method, method(per_task, **hp), back)


def _fan_in_fan_out(members: Sequence[Delta], space: str) -> bool:
    """Whether the members' LoRA branches are of ``fan_in_fan_out`` layers (dense members follow them)."""
    fans = {d.fan_in_fan_out for d in members if isinstance(d, LowRank)}
    if len(fans) > 1:
        raise ConfigError(f"{space} space: members disagree on fan_in_fan_out")
    return fans == {True}


def merge_core(method: MergeMethod, members: Sequence[Delta], hp: dict[str, Any]) -> Delta | list[Delta]:
    if not all(isinstance(d, LowRank) for d in members):
        if all(not isinstance(d, LowRank) and d.dim() < 2 for d in members):
            return _each(method, method(list(members), **hp), lambda r: r)  # biases and norms: full space
        raise ConfigError("core space needs LoRA (low-rank) updates for every matrix; got a dense delta")
    fan = _fan_in_fan_out(members, "core")
    like = members[0].dense()
    bs = [d.B.reshape(d.B.shape[0], -1).to(torch.float64) * d.scaling for d in members]  # (m, r_i)
    as_ = [d.A.reshape(d.A.shape[0], -1).to(torch.float64) for d in members]  # (r_i, n')
    u_b, s_b, _ = torch.linalg.svd(torch.cat(bs, dim=1), full_matrices=False)
    u_b = u_b[:, : _rank(s_b, (u_b.shape[0], sum(b.shape[1] for b in bs)), members[0].B.dtype)]  # (m, R)
    _, s_a, vh_a = torch.linalg.svd(torch.cat(as_, dim=0), full_matrices=False)
    v_a = vh_a[: _rank(s_a, (sum(a.shape[0] for a in as_), vh_a.shape[1]), members[0].A.dtype)].T  # (n', R')
    cores = [u_b.T @ b @ a @ v_a for b, a in zip(bs, as_, strict=True)]  # (R, R') each

    def back(merged: torch.Tensor) -> Delta:
        out = _as_low_rank(u_b @ merged, v_a.T, like)
        # fan_in_fan_out layers (GPT-2 Conv1D) store ΔWᵀ: B·A is computed untransposed, as PEFT does
        return LowRank(out.A, out.B, out.scaling, True) if fan else out

    return _each(method, method(cores, **hp), back)


SPACES.register("full", merge_full)
SPACES.register("knots", merge_knots)
SPACES.register("core", merge_core)
