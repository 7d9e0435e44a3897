"""Attacks on a protected update: merge-coefficient searches (more in later modules)."""

from trap2.attacks.search import PAPER_GRID, SearchResult, search_coefficient

__all__ = ["PAPER_GRID", "SearchResult", "search_coefficient"]
