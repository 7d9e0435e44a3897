"""A suite's update released through a post-hoc defense instead of Trap², for the attack matrix:
W0 + ΔW reparameterised by PaRaMS or Merge-Lock (function-preserving), handed back as ΔW' = W' − W0."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from trap2.defenses.merge_lock import merge_lock
from trap2.defenses.params import params_defense
from trap2.errors import ConfigError
from trap2.updates import Update

if TYPE_CHECKING:
    from trap2.suites.base import Suite

# name → (full weights W, pretrained W0, attention heads) → reparameterised full weights W'
Defense = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], int], dict[str, torch.Tensor]]
DEFENSES: dict[str, Defense] = {
    "params": lambda full, w0, n_heads: params_defense(full, w0, n_heads=n_heads),
    "merge_lock": lambda full, w0, n_heads: merge_lock(full, n_heads=n_heads),
}
BASELINES = tuple(DEFENSES)


def baseline_update(suite: Suite, update: Update, defense: str, w0: Mapping[str, torch.Tensor]) -> Update:
    """The unprotected ``update`` released instead through a post-hoc defense: the full weights
    W0 + ΔW reparameterised (function-preserving), as a dense delta from the suite's ``w0``."""
    if defense not in DEFENSES:
        raise ConfigError(f"defense {defense!r} is not one of {', '.join(DEFENSES)}")
    n_heads = suite.info.get("n_heads")
    if not isinstance(n_heads, int):
        raise ConfigError(f"baselines need a Transformer suite (n_heads); {suite.name!r} has none")
    delta = update.dense()
    full = {n: w0[n] + delta[n] if n in delta else w0[n] for n in w0}
    locked = DEFENSES[defense](full, w0, n_heads)
    meta = {**update.meta, "defense": defense}
    return Update({n: locked[n] - w0[n] for n in w0 if not torch.equal(locked[n], w0[n])}, meta)
