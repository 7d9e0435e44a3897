"""``recover10`` / ``recover100``: the global optimum fine-tuned on 10 / 100 labelled samples per task
(:mod:`trap2.attacks.recover`); the record's ``from_w0`` is the same recovery from W0 itself."""

from __future__ import annotations

from trap2.attacks.recover import KS
from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search


def _recover_search(k: int):
    def run(cell: Cell, best: GlobalOptimum) -> Found:
        from trap2.attacks.recover import recover

        ctx = cell.ctx
        scaled = {n: best.c * d for n, d in best.merged.items()}
        params = ctx.params(recover(ctx.suite, cell.tasks(), ctx.w0, scaled, k, backbone=ctx.backbone))
        extra = {"from_w0": ctx.recovered_from_w0(k, list(best.merged))}
        return Found(ctx.val_score(params), params, best.c, [best.c] * len(cell.pool), extra)

    return run


for _k in KS:
    search(
        f"recover{_k}",
        summary=f"the global optimum fine-tuned on {_k} labelled samples per task",
        one_model=True,
    )(_recover_search(_k))
