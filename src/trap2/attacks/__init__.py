"""Attacks on a protected update: merge-coefficient searches over merge methods and spaces."""

from trap2.attacks.merge_attack import SEARCHES, EvalContext, attack_matrix, run_attack
from trap2.attacks.search import PAPER_GRID, SearchResult, search_coefficient

__all__ = [
    "PAPER_GRID",
    "SEARCHES",
    "EvalContext",
    "SearchResult",
    "attack_matrix",
    "run_attack",
    "search_coefficient",
]
