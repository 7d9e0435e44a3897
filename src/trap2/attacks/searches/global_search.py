"""``global``: W0 + c·merge(ΔW_1..ΔW_T), c over the paper's grid (early stop 10); with ``hparam_search``
the method's own hyperparameters are then searched coordinate-wise over their grids (each value: one
merge, then the coefficient search again). A hyperparameter marked ``searched`` (CART's β, a merge
weight its paper tunes) is walked always, unless the caller fixes it. Every other search starts from this optimum.

The merged delta is computed once per hyperparameter setting; each coefficient point is one evaluation
(no re-merge, no model copy). The optimum is remembered per pool content and cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trap2.attacks.context import update_key
from trap2.attacks.search import search_coefficient
from trap2.attacks.searches.base import DATA_METHODS, Cell, Found, GlobalOptimum, search
from trap2.merging import INTERNAL_HPARAMS, TaskDeltas, get_merge_method, merge_updates


def merged_at(cell: Cell, hp: Mapping[str, Any]) -> dict[str, torch.Tensor] | TaskDeltas:
    """merge(ΔW_1..ΔW_T) at hyperparameters ``hp`` as dense deltas (one per member for a per-task
    method)."""
    if cell.method in DATA_METHODS:
        from trap2.attacks.chain_of_merges import chain_of_merges_delta
        from trap2.attacks.regmean import N_SAMPLES, regmean_delta

        ctx = cell.ctx
        dense = [u.dense() for u in cell.pool]
        merge = {"regmean": regmean_delta, "chain_of_merges": chain_of_merges_delta}[cell.method]
        return merge(ctx.backbone, ctx.w0, dense, cell.unlabelled_inputs(N_SAMPLES))
    return merge_updates(cell.pool, cell.method, cell.space, **hp).dense()


def _coefficient_search(
    cell: Cell, hp: Mapping[str, Any]
) -> tuple[float, float, dict[str, torch.Tensor] | TaskDeltas]:
    merged = merged_at(cell, hp)  # once per hyperparameter setting
    ctx = cell.ctx
    found = search_coefficient(lambda c: ctx.val_score(ctx.params(merged, c)), cell.grid)
    return found.coefficient, found.score, merged


def global_optimum(
    cell: Cell, hparams: Mapping[str, Any] | None = None, hparam_search: bool = False
) -> GlobalOptimum:
    """The best W0 + c·merge on validation, at ``hparams`` (defaults filled in) or, with
    ``hparam_search``, at the best setting a coordinate-wise walk over the method's grids finds; the
    ``searched`` hyperparameters not given in ``hparams`` are walked in either case."""
    ctx = cell.ctx
    m = None if cell.method in DATA_METHODS else get_merge_method(cell.method)
    resolved = {} if m is None else m.resolve(**(hparams or {}))
    hp0 = {k: v for k, v in resolved.items() if k not in INTERNAL_HPARAMS}
    given = set(hparams or {})
    walk = (
        []
        if m is None
        else [n for n, spec in m.hparams.items() if hparam_search or (spec.searched and n not in given)]
    )
    key = (
        "global",
        tuple(walk),
        tuple(update_key(u) for u in cell.pool),
        cell.method,
        cell.space,
        hparam_search,
        tuple(sorted(hp0.items())),
        cell.grid,
    )
    fresh: list[dict[str, torch.Tensor]] = []  # the merge at the optimum, when found in this call

    def compute() -> tuple[float, float, dict[str, Any], int]:
        n0 = ctx.evaluations
        c, score, merged = _coefficient_search(cell, hp0)
        hp = hp0
        if m is not None:
            for name in walk:
                for value in m.hparams[name].grid:
                    if value == hp[name]:
                        continue
                    trial = {**hp, name: value}
                    c2, s2, merged2 = _coefficient_search(cell, trial)
                    if s2 > score:
                        c, score, merged, hp = c2, s2, merged2, trial
        fresh.append(merged)
        return c, score, hp, ctx.evaluations - n0

    c, score, hp, n = ctx.cached(key, compute)
    # a remembered optimum keeps (c, score, hp, cost) only: its merge is redone, not held in memory
    merged = fresh[0] if fresh else merged_at(cell, hp)
    return GlobalOptimum(c, score, merged, dict(hp), n)


@search("global", summary="one coefficient c for the whole merge: W0 + c·merge(ΔW_1..ΔW_T)")
def global_(cell: Cell, best: GlobalOptimum) -> Found:
    return Found(best.score, cell.ctx.params(best.merged, best.c), best.c, [best.c] * len(cell.pool))
