"""``per_task``: W0 + merge(c_1·ΔW_1, …, c_T·ΔW_T), coordinate ascent over each c_i from the global
optimum (two sweeps over ``PER_TASK_GRID``; a weight moves only on a strict improvement). Task arithmetic
is linear, so its points never re-merge; for other methods each point is one merge and one evaluation.
"""

from __future__ import annotations

from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search

PER_TASK_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SWEEPS = 2


@search("per_task", summary="one coefficient per member, coordinate ascent from the global c", reweights=True)
def per_task(cell: Cell, best: GlobalOptimum) -> Found:
    ctx, fn = cell.ctx, cell.merge_fn(best.hp)
    score, weights = best.score, [best.c] * len(cell.pool)
    for _sweep in range(SWEEPS):
        improved = False
        for i in range(len(weights)):
            for w in PER_TASK_GRID:
                if w == weights[i]:
                    continue
                trial = weights[:i] + [w] + weights[i + 1 :]
                s = ctx.val_score(ctx.params(fn(trial)))
                if s > score:
                    score, weights, improved = s, trial, True
        if not improved:
            break
    return Found(score, ctx.params(fn(weights)), best.c, weights)
