"""``restore``: after a non-linear merge, the protected member's remnant removed and the member added
back at scale 1 (:func:`restore_member`); the others' coefficient searched: W0 + c·rest + ΔW_p."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trap2.attacks.search import search_coefficient
from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search


def restore_member(
    merged: Mapping[str, torch.Tensor], member: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``merged`` without the member's component: per tensor, minus its least-squares projection a·ΔW.

    TIES and DARE shrink each member by an amount the attacker does not control; removing what is left
    of the protected update lets it be added back at its nominal scale (the "restore" search)."""
    rest = {}
    for n, m in merged.items():
        d = member.get(n)
        if d is None:
            rest[n] = m
            continue
        a = (m.double() * d.double()).sum() / (d.double() * d.double()).sum().clamp_min(1e-30)
        rest[n] = m - a.to(m.dtype) * d
    return rest


@search(
    "restore",
    summary="the protected member's remnant replaced by the member at 1",
    needs_protected=True,
    one_model=True,
)
def restore(cell: Cell, best: GlobalOptimum) -> Found:
    ctx, p = cell.ctx, cell.protected
    member = cell.pool[p].dense()
    rest = restore_member(best.merged, member)  # the merge at its best hyperparameters, member removed
    names = dict.fromkeys([*rest, *member])

    def restored(c: float) -> dict[str, torch.Tensor]:
        return {n: c * rest.get(n, 0) + member.get(n, 0) for n in names}

    found = search_coefficient(lambda c: ctx.val_score(ctx.params(restored(c))), cell.grid)
    c = found.coefficient
    weights = [1.0 if i == p else c for i in range(len(cell.pool))]
    return Found(found.score, ctx.params(restored(c)), c, weights)
