"""mergekit (https://github.com/arcee-ai/mergekit, LGPL-3.0; optional extra ``trap2[mergekit]``) as an
attacker. mergekit merges whole checkpoints against a base, so each update is folded into W0 first:
models {base: W0, m_i: W0 + ΔW_i}, then ``mergekit.merge_methods.merge_state_dicts`` in process.

TA and TIES agree with trap2's kernels to float precision. DARE differs in two ways: mergekit draws its
masks from torch's global RNG, and it rescales survivors to restore each delta's L1 norm (dividing by
the fraction actually kept) where the DARE paper and trap2 divide by 1 − p.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trap2.errors import ConfigError

# trap2 method -> (mergekit method, hyperparameter translation)
METHODS: dict[str, tuple[str, Any]] = {
    "ta": ("task_arithmetic", lambda hp: {"normalize": False}),
    "ties": ("ties", lambda hp: {"density": hp.get("k", 20.0) / 100.0, "normalize": True}),
    "dare": ("dare_linear", lambda hp: {"density": 1.0 - hp.get("p", 0.5), "normalize": False}),
    "dare_ties": ("dare_ties", lambda hp: {"density": 1.0 - hp.get("p", 0.5), "normalize": True}),
}


def require_mergekit() -> Any:
    try:
        from mergekit import merge_methods
    except ImportError:
        raise ConfigError(
            "mergekit is not installed: pip install 'trap2[mergekit]' (mergekit==0.1.5)"
        ) from None
    return merge_methods


def mergekit_merge(
    w0: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    weights: Sequence[float] | None = None,
    **hparams: Any,
) -> dict[str, torch.Tensor]:
    """The merged delta mergekit produces for the given updates (names = the deltas' names)."""
    api = require_mergekit()
    if method not in METHODS:
        raise ConfigError(f"no mergekit counterpart for {method!r}; valid: {', '.join(METHODS)}")
    name, translate = METHODS[method]
    names = sorted({n for d in deltas for n in d})
    base = {n: w0[n].to(torch.float32) for n in names}
    models: dict[str, dict[str, torch.Tensor]] = {"base": base}
    for i, d in enumerate(deltas):
        models[f"m{i}"] = {n: base[n] + d[n].to(torch.float32) if n in d else base[n] for n in names}
    w = list(weights) if weights is not None else [1.0] * len(deltas)
    params: dict[str, Any] = {"weight": {f"m{i}": w[i] for i in range(len(deltas))}}
    for key, value in translate(hparams).items():
        params[key] = {f"m{i}": value for i in range(len(deltas))} if key == "density" else value
    merged = api.merge_state_dicts(models, name, parameters=params, base="base")
    return {n: merged[n] - base[n] for n in names}
