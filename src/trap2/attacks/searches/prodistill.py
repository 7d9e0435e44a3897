"""``prodistill``: task arithmetic with one coefficient per member and tensor, learned from the global
optimum by distilling each member's standalone features on unlabelled samples
(:mod:`trap2.attacks.prodistill`); the better of the two on validation is kept. When the distilled merge
wins, the record's ``coefficients`` are each member's mean over tensors and ``tensor_coefficients``
holds them all ({tensor: [c_1, …, c_T]}).
"""

from __future__ import annotations

from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search


@search(
    "prodistill",
    summary="per-member, per-tensor coefficients distilled from unlabelled samples",
    reweights=True,
    methods=("ta",),
)
def prodistill(cell: Cell, best: GlobalOptimum) -> Found:
    from trap2.attacks.prodistill import N_SAMPLES, distill_coefficients, merged_delta

    ctx = cell.ctx
    dense = [u.dense() for u in cell.pool]
    inputs = cell.unlabelled_inputs(N_SAMPLES)
    coef, names, _ = distill_coefficients(ctx.backbone, ctx.w0, dense, inputs, init=best.c)
    distilled = ctx.params(merged_delta(dense, coef, names))
    s = ctx.val_score(distilled)
    if s > best.score:  # the attacker keeps whichever merge validates better
        per_member = [float(v) for v in coef.mean(1)]
        per_tensor = {n: [float(v) for v in coef[:, j]] for j, n in enumerate(names)}
        return Found(s, distilled, best.c, per_member, {"tensor_coefficients": per_tensor})
    return Found(best.score, ctx.params(best.merged, best.c), best.c, [best.c] * len(cell.pool))
