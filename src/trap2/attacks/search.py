"""Coefficient search: the attacker picks the merge coefficient c on validation data.

The paper's protocol: c over 0.1, 0.2, …, 9.9 in order, stop after ``patience`` points without
improvement, criterion = mean normalised validation accuracy (acc / the unprotected fine-tuned accuracy
of that task). The merged delta is computed once; each grid point costs one evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PAPER_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 100))


@dataclass
class SearchResult:
    coefficient: float
    score: float
    tried: list[tuple[float, float]] = field(default_factory=list)  # (c, score) in order


def search_coefficient(
    score: Callable[[float], float], grid: Sequence[float] = PAPER_GRID, patience: int | None = 10
) -> SearchResult:
    """Maximise ``score(c)`` over ``grid`` (first best wins ties), early-stopping after ``patience``."""
    best_c, best_s, misses = grid[0], float("-inf"), 0
    tried = []
    for c in grid:
        s = score(c)
        tried.append((c, s))
        if s > best_s:
            best_c, best_s, misses = c, s, 0
        else:
            misses += 1
            if patience is not None and misses >= patience:
                break
    return SearchResult(best_c, best_s, tried)
