"""Merge attacks on a pool of updates: merge (method × space), search the coefficients on the suite's
validation split, then report test accuracy.

Every search starts from the cell's global optimum (:func:`~trap2.attacks.searches.global_optimum`:
the best W0 + c·merge, optionally over the method's hyperparameters), found once per pool and cell and
passed to the search by name from the registry in :mod:`trap2.attacks.searches` (``global``,
``per_task``, ``pinned``, ``restore``, ``untrap``, ``prodistill``, ``recover10``, ``recover100``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from trap2.attacks.context import EvalContext
from trap2.attacks.search import PAPER_GRID
from trap2.attacks.searches import (
    DATA_METHODS,
    SEARCH_REGISTRY,
    SEARCHES,
    TA_SEARCHES,
    Cell,
    global_optimum,
    restore_member,
)
from trap2.errors import ConfigError
from trap2.eval.cells import CellStore, context_key, pool_key
from trap2.updates import Update

__all__ = [
    "DATA_METHODS",
    "SEARCHES",
    "TA_SEARCHES",
    "EvalContext",
    "attack_matrix",
    "restore_member",
    "run_attack",
]


def run_attack(
    ctx: EvalContext,
    pool: Sequence[Update],
    method: str,
    space: str = "full",
    search: str = "global",
    protected_index: int | None = None,
    hparams: Mapping[str, Any] | None = None,
    hparam_search: bool = False,
    grid: Sequence[float] = PAPER_GRID,
) -> dict[str, Any]:
    """One cell of the attack matrix: the best merge the attacker finds on validation, scored on test.

    The record: method, space, search, coefficient (the global c, or the search's own), coefficients
    (one per member), hparams, val_score, evaluations (validation passes, the global search included),
    acc (test accuracy per task and their mean), and the search's own fields (``from_w0``, …)."""
    if search not in SEARCH_REGISTRY:
        raise ConfigError(f"unknown search {search!r}; valid: {', '.join(SEARCHES)}")
    spec = SEARCH_REGISTRY.get(search)
    cell = Cell(ctx, tuple(pool), method, space, protected_index, tuple(grid))
    spec.check(cell)
    if spec.prepare is not None:
        cell = dataclasses.replace(cell, pool=tuple(spec.prepare(cell)))
    best = global_optimum(cell, hparams, hparam_search)
    n0 = ctx.evaluations
    found = spec.fn(cell, best)
    return {
        "method": method,
        "space": space,
        "search": search,
        "coefficient": found.coefficient,
        "coefficients": found.coefficients,
        "hparams": dict(best.hp),
        "val_score": found.score,
        "evaluations": best.evaluations + ctx.evaluations - n0,
        "acc": ctx.test_accs(found.params),
        **found.extra,
    }


def attack_matrix(
    ctx: EvalContext,
    pools: Mapping[bool, Sequence[Update]],
    cells: Sequence[tuple[str, str, str]],
    protected_index: int | None = None,
    hparam_search: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    store: CellStore | None = None,
) -> list[dict[str, Any]]:
    """Run every (method, space, search) cell on each pool ({protected: pool}); same budget for both.

    ``store``: finished cells are read from it and new ones written to it (a stopped run resumes)."""
    store = store or CellStore()
    base = {"kind": "attack", **context_key(ctx), "hparam_search": hparam_search, "grid": list(PAPER_GRID)}
    members = {p: pool_key(pool) for p, pool in pools.items()}
    out = []
    for method, space, search in cells:
        # only a search that reads the protected member's index depends on it: every other cell on the
        # same pool is the same record whichever member is protected (a bench's unprotected pool is one
        # pool for all its targets)
        needs = search in SEARCH_REGISTRY and SEARCH_REGISTRY.get(search).needs_protected
        for is_protected, pool in pools.items():
            key = {**base, "protected_index": protected_index if needs else None}
            key |= {"pool": members[is_protected], "protected": is_protected}
            key |= {"method": method, "space": space, "search": search}
            attack = partial(
                run_attack, ctx, pool, method, space, search, protected_index, hparam_search=hparam_search
            )
            rec, _ = store.run(key, attack)
            rec["protected"] = is_protected
            out.append(rec)
            if on_cell:
                on_cell(rec)
    return out
