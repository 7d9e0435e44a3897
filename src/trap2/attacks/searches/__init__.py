"""Searches over a merge's coefficients, one module and one registration each (like merge methods);
``run_attack`` looks a search up by name and never branches on it.

Registration order is the order of :data:`SEARCHES` (the order the CLI and docs list them in).
"""

from trap2.attacks.searches.base import (
    DATA_METHODS,
    SEARCH_REGISTRY,
    Cell,
    Found,
    GlobalOptimum,
    Search,
    search,
)

# importing the modules registers the searches, in this order
# isort: off
from trap2.attacks.searches import (
    global_search,
    per_task,
    pinned,
    restore,
    untrap,
    distill,
    prodistill,
    recover,
)

# isort: on
from trap2.attacks.searches.global_search import global_optimum
from trap2.attacks.searches.restore import restore_member

SEARCHES: tuple[str, ...] = tuple(SEARCH_REGISTRY.registered())
# searches that re-weight members inside the merge (``prodistill``: per tensor, task arithmetic only)
TA_SEARCHES: tuple[str, ...] = tuple(n for n in SEARCHES if SEARCH_REGISTRY.get(n).reweights)

__all__ = [
    "DATA_METHODS",
    "SEARCHES",
    "SEARCH_REGISTRY",
    "TA_SEARCHES",
    "Cell",
    "Found",
    "GlobalOptimum",
    "Search",
    "distill",
    "global_optimum",
    "global_search",
    "per_task",
    "pinned",
    "prodistill",
    "recover",
    "restore",
    "restore_member",
    "search",
    "untrap",
]
