"""Merge methods (registry + one module each) and the model-level ``merge_deltas``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trap2.errors import ConfigError
from trap2.merging import task_arithmetic, ties  # noqa: F401  (registers the methods)
from trap2.merging.registry import METHODS, HParam, MergeMethod, merge_method
from trap2.merging.ties import magnitude_threshold


def get_merge_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def merge_deltas(
    method: str | MergeMethod, deltas: Sequence[Mapping[str, torch.Tensor]], **hparams: Any
) -> dict[str, torch.Tensor]:
    """Merge dense updates tensor by tensor: {name: method([ΔW_1[name], …, ΔW_T[name]])}.

    A name missing from some updates is merged over the updates that have it (a missing delta is 0
    for task arithmetic; for the averaging methods it does not dilute the others).
    """
    m = get_merge_method(method) if isinstance(method, str) else method
    if not deltas:
        raise ConfigError("merge needs at least one update")
    resolved = m.resolve(**hparams)
    if m.name == "ties" and resolved["scope"] == "model":
        resolved["thresholds"] = [
            magnitude_threshold(torch.cat([t.flatten() for t in d.values()]), resolved["k"]) for d in deltas
        ]
    names = list(dict.fromkeys(n for d in deltas for n in d))
    out = {}
    for name in names:
        members = [d[name] for d in deltas if name in d]
        if m.name == "ties" and resolved["thresholds"] is not None:
            ths = [t for d, t in zip(deltas, resolved["thresholds"], strict=True) if name in d]
            out[name] = m(members, **{**resolved, "thresholds": ths})
        else:
            out[name] = m(members, **resolved)
    return out


__all__ = ["METHODS", "HParam", "MergeMethod", "get_merge_method", "merge_deltas", "merge_method"]
