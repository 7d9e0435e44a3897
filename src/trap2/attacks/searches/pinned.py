"""``pinned``: the protected member fixed at its nominal scale, the others' common coefficient searched:
W0 + merge(ΔW_p, c·ΔW_j≠p)."""

from __future__ import annotations

from trap2.attacks.search import search_coefficient
from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search


@search(
    "pinned",
    summary="the protected member at 1, the others' common coefficient searched",
    needs_protected=True,
    reweights=True,
)
def pinned(cell: Cell, best: GlobalOptimum) -> Found:
    ctx, fn, p = cell.ctx, cell.merge_fn(best.hp), cell.protected

    def weights_at(c: float) -> list[float]:
        return [1.0 if i == p else c for i in range(len(cell.pool))]

    found = search_coefficient(lambda c: ctx.val_score(ctx.params(fn(weights_at(c)))), cell.grid)
    weights = weights_at(found.coefficient)
    return Found(found.score, ctx.params(fn(weights)), found.coefficient, weights)
