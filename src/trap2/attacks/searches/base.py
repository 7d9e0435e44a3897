"""Searches as frozen specs, registered by name like merge methods.

A search is a function ``fn(cell, best) -> Found``: given one cell of the attack matrix (the pool, the
merge method and space, the evaluation context) and the cell's global optimum ``best`` (the coefficient
c and hyperparameters the global search found, with the merged delta), it returns the best setting it
finds on validation. ``@search(...)`` registers it with what the runner checks before it runs: whether
it needs the protected member's index, which merge methods it serves, whether it re-weights members
inside the merge (so needs a pure-math merge method), whether it needs one merged model (so refuses a
per-task merge such as EMR-Merging's), and an optional ``prepare`` that replaces the pool the global
search runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trap2.attacks.context import EvalContext
from trap2.errors import ConfigError
from trap2.merging import TaskDeltas, get_merge_method, merge_updates
from trap2.registry import Registry
from trap2.updates import Update

# merges that need data besides the deltas (not in the pure-math registry); full space only:
# {name: (summary, reference)}, for the CLI's listing
DATA_METHOD_INFO: dict[str, tuple[str, str]] = {
    "regmean": (
        "per linear layer, the weights that best reproduce each member's layer outputs on 64 unlabelled "
        "inputs of its task (data-dependent)",
        "Jin et al., ICLR 2023, arXiv:2212.09849",
    ),
    "chain_of_merges": (
        "RegMean layer by layer, each layer's input statistics recomputed with the earlier layers merged "
        "(data-dependent)",
        "Buzzega et al., 2025 (Chain of Merges); Trap² paper Table 5",
    ),
}
DATA_METHODS = tuple(DATA_METHOD_INFO)


@dataclass(frozen=True)
class GlobalOptimum:
    """The global search's best point: W0 + c·merged scores ``score`` on validation, at the merge
    method's hyperparameters ``hp``; ``evaluations`` is what finding it cost (counted in every record
    that builds on it, also when it was remembered from an earlier cell)."""

    c: float
    score: float
    merged: dict[str, torch.Tensor] | TaskDeltas  # TaskDeltas: a per-task merge (EMR)
    hp: dict[str, Any]
    evaluations: int = 0


@dataclass(frozen=True)
class Cell:
    """One cell of the attack matrix: what every search is given besides the global optimum."""

    ctx: EvalContext
    pool: tuple[Update, ...]
    method: str
    space: str
    protected_index: int | None
    grid: tuple[float, ...]

    @property
    def protected(self) -> int:
        if self.protected_index is None:  # the runner checks ``needs_protected`` first
            raise ConfigError("this search needs the index of the protected member")
        return self.protected_index

    def tasks(self) -> list[str]:
        """Each member's task: its own metadata, else the suite's task at its position."""
        return [u.meta.get("task") or self.ctx.tasks[i] for i, u in enumerate(self.pool)]

    def unlabelled_inputs(self, n: int) -> list[torch.Tensor]:
        """The first ``n`` training inputs of each member's task (labels never read)."""
        return [self.ctx.suite.task(t).train.x[:n] for t in self.tasks()]

    def merge_fn(
        self, hp: Mapping[str, Any]
    ) -> Callable[[Sequence[float]], dict[str, torch.Tensor] | TaskDeltas]:
        """member weights -> merged dense delta; linear (no re-merge) for task arithmetic."""
        if self.method == "ta":
            dense = [u.dense() for u in self.pool]

            def linear(weights: Sequence[float]) -> dict[str, torch.Tensor]:
                names = dict.fromkeys(n for d in dense for n in d)
                return {
                    n: sum(w * d[n] for w, d in zip(weights, dense, strict=True) if n in d) for n in names
                }

            return linear
        return lambda w: merge_updates(self.pool, self.method, self.space, weights=list(w), **hp).dense()


@dataclass
class Found:
    """A search's best setting: its validation score, the parameters test accuracy is measured at, the
    coefficient and per-member weights to report, and any further record fields."""

    score: float
    params: dict[str, torch.Tensor]
    coefficient: float
    coefficients: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


SearchFn = Callable[[Cell, GlobalOptimum], Found]


@dataclass(frozen=True)
class Search:
    name: str
    fn: SearchFn
    summary: str
    needs_protected: bool = False
    reweights: bool = False  # weights members inside the merge: pure-math merge methods only
    methods: tuple[str, ...] | None = None  # the merge methods it serves (None: every one)
    prepare: Callable[[Cell], Sequence[Update]] | None = None  # the pool the global search runs on
    one_model: bool = False  # works on one merged model: not for per-task merges (EMR)

    def check(self, cell: Cell) -> None:
        """Refuse a cell this search cannot run, with a one-line error."""
        if self.needs_protected and cell.protected_index is None:
            raise ConfigError(f"search={self.name!r} needs the index of the protected member")
        if self.methods is not None and cell.method not in self.methods:
            valid = ", ".join(repr(m) for m in self.methods)
            raise ConfigError(
                f"search={self.name!r} runs with merge method {valid} only, not {cell.method!r}"
            )
        if self.one_model and per_task_method(cell.method):
            raise ConfigError(
                f"search={self.name!r} works on one merged model; {cell.method} gives one per task"
            )
        if cell.method in DATA_METHODS and (cell.space != "full" or self.reweights):
            raise ConfigError(
                f"{cell.method} runs in full space, and not with a search that re-weights members "
                f"(search={self.name!r})"
            )


def per_task_method(method: str) -> bool:
    """Whether ``method`` gives one merged model per task (EMR-Merging)."""
    return method not in DATA_METHODS and get_merge_method(method).per_task


SEARCH_REGISTRY: Registry[Search] = Registry("search")


def search(
    name: str,
    *,
    summary: str,
    needs_protected: bool = False,
    reweights: bool = False,
    methods: tuple[str, ...] | None = None,
    prepare: Callable[[Cell], Sequence[Update]] | None = None,
    one_model: bool = False,
) -> Callable[[SearchFn], Search]:
    def wrap(fn: SearchFn) -> Search:
        spec = Search(name, fn, summary, needs_protected, reweights, methods, prepare, one_model)
        return SEARCH_REGISTRY.register(name, spec)

    return wrap
