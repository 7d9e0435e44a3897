"""Attacks on a protected update: merge-coefficient searches over merge methods and spaces."""

from trap2.attacks.merge_attack import (
    DATA_METHODS,
    SEARCHES,
    TA_SEARCHES,
    EvalContext,
    attack_matrix,
    restore_member,
    run_attack,
)
from trap2.attacks.search import PAPER_GRID, SearchResult, search_coefficient
from trap2.attacks.searches import SEARCH_REGISTRY, GlobalOptimum

__all__ = [
    "DATA_METHODS",
    "PAPER_GRID",
    "SEARCHES",
    "TA_SEARCHES",
    "EvalContext",
    "GlobalOptimum",
    "SEARCH_REGISTRY",
    "SearchResult",
    "attack_matrix",
    "restore_member",
    "run_attack",
    "search_coefficient",
]
