"""``untrap``: the protected member fine-tuned alone on k labelled samples to work at every scale
(:mod:`trap2.attacks.untrap`), then the global search on the pool with it."""

from __future__ import annotations

from collections.abc import Sequence

from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search
from trap2.updates import Update


def untrapped_pool(cell: Cell) -> Sequence[Update]:
    return [cell.ctx.untrapped(u) if i == cell.protected else u for i, u in enumerate(cell.pool)]


@search(
    "untrap",
    summary="the protected member un-trapped on k labelled samples, then the global search",
    needs_protected=True,
    prepare=untrapped_pool,
)
def untrap(cell: Cell, best: GlobalOptimum) -> Found:
    return Found(best.score, cell.ctx.params(best.merged, best.c), best.c, [best.c] * len(cell.pool))
