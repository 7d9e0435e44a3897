"""PEFT's own merging as an attacker: ``PeftModel.add_weighted_adapter``.

This drives stock PEFT on real adapter folders, exactly as a hub user would. Its ``linear``, ``ties``,
``dare_linear`` and ``dare_ties`` types merge the A and B factors separately (ΣA·ΣB is not Σ B·A, so
they are not task arithmetic on ΔW); ``cat`` concatenates the factors and is exact task arithmetic;
``svd`` refits a low-rank factorisation of the weighted sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torch import nn

from trap2.errors import ConfigError
from trap2.updates import Update

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "cat", "svd", "ties_svd", "dare_ties_svd")


def peft_weighted_merge(
    make_base: Callable[[], nn.Module],
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    combination_type: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
) -> Update:
    """Load each adapter folder into one PeftModel, merge with PEFT, and return the merged update."""
    from peft import PeftModel

    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"unknown PEFT combination_type {combination_type!r}; valid: {', '.join(COMBINATIONS)}"
        )
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters")
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(make_base(), str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    kwargs = {}
    if density is not None:
        kwargs["density"] = density
    if svd_rank is not None:
        kwargs["svd_rank"] = svd_rank
    try:
        model.add_weighted_adapter(
            names, list(weights), "merged", combination_type=combination_type, **kwargs
        )
    except ValueError as e:  # e.g. linear needs equal ranks
        raise ConfigError(
            f"PEFT add_weighted_adapter({combination_type}): {str(e).splitlines()[0]}"
        ) from None
    update = Update.from_peft_model(model, adapter="merged")
    update.meta["merge"] = {
        "tool": "peft.add_weighted_adapter",
        "combination_type": combination_type,
        "weights": list(weights),
        "density": density,
    }
    return update
