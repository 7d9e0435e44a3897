"""Merge methods as frozen specs: a pure kernel plus its hyperparameters and reference.

``@merge_method(...)`` turns a typed function ``fn(deltas: list[Tensor], **hparams) -> Tensor`` into a
:class:`MergeMethod` and registers it; a duplicate name is an error. Hyperparameters are validated
before the kernel runs, and the CLI's listing and the docs table come from these specs.

A ``per_task`` method (EMR-Merging) returns one merged tensor per member, stacked (T, ...): member i is
evaluated with its own slice, and ``merge_updates`` returns a :class:`~trap2.merging.PerTaskMerge`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trap2.errors import ConfigError
from trap2.registry import Registry

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class HParam:
    default: Any
    help: str
    check: Callable[[Any], bool] = lambda v: True
    valid: str = "any value"  # what ``check`` accepts, for the error message
    grid: tuple[Any, ...] = ()  # the values a search tries (paper protocol)
    # a merge weight of the method's own (CART's β): the attacker's global search always walks its grid,
    # as the method's paper tunes it, not only under ``hparam_search``; a value given explicitly is kept
    searched: bool = False


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Kernel
    summary: str
    reference: str
    hparams: dict[str, HParam] = field(default_factory=dict)
    # hparams under which one input is returned as is; None: no setting does (Iso-C flattens its spectrum)
    identity: dict[str, Any] | None = field(default_factory=dict)
    per_task: bool = False  # the kernel returns one result per member, stacked (T, ...)
    # scope='model': per-member internal hparams computed once over the whole weighted update (full space),
    # {name: [value per member]}; None: the TIES magnitude thresholds
    model_scope: Callable[[list[dict[str, torch.Tensor]]], dict[str, list[Any]]] | None = None

    def resolve(self, **given: Any) -> dict[str, Any]:
        """Defaults filled in, unknown names and out-of-range values rejected."""
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            valid = ", ".join(self.hparams) or "none"
            raise ConfigError(
                f"merge method {self.name!r} has no hyperparameter {unknown[0]!r}; valid: {valid}"
            )
        out = {k: given.get(k, h.default) for k, h in self.hparams.items()}
        for k, v in out.items():
            if not self.hparams[k].check(v):
                raise ConfigError(f"{self.name}: {k}={v!r} is out of range; valid: {self.hparams[k].valid}")
        return out

    def __call__(self, deltas: Sequence[torch.Tensor], **hparams: Any) -> torch.Tensor:
        if not deltas:
            raise ConfigError(f"{self.name}: nothing to merge")
        shapes = {tuple(d.shape) for d in deltas}
        if len(shapes) != 1:
            raise ConfigError(f"{self.name}: deltas of different shapes {sorted(shapes)}")
        return self.kernel(list(deltas), **self.resolve(**hparams))


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    summary: str,
    reference: str,
    hparams: dict[str, HParam] | None = None,
    identity: dict[str, Any] | None = None,
    no_identity: bool = False,
    per_task: bool = False,
    model_scope: Callable[[list[dict[str, torch.Tensor]]], dict[str, list[Any]]] | None = None,
) -> Callable[[Kernel], MergeMethod]:
    def wrap(fn: Kernel) -> MergeMethod:
        ident = None if no_identity else dict(identity or {})
        spec = MergeMethod(name, fn, summary, reference, dict(hparams or {}), ident, per_task, model_scope)
        return METHODS.register(name, spec)

    return wrap
