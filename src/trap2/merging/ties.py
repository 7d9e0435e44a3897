"""TIES-Merging (Yadav et al., NeurIPS 2023): trim each ΔW_i to its top-k % magnitudes, elect the sign
per entry as sign(Σ_i trimmed_i), and average only the entries that agree with it (disjoint mean).

``scope='tensor'`` trims within each tensor (PEFT's ``merge_utils.ties``); ``scope='model'`` trims over
the whole update, as the original TIES and FusionBench do (the model-level threshold of each weighted
member is computed by ``trap2.merging.merge_updates`` and passed in as ``thresholds``; full space only,
since KnOTS/Core factors of different tensors are in different units).
"""

from __future__ import annotations

import torch

from trap2.merging.registry import HParam, merge_method


def magnitude_threshold(values: torch.Tensor, k: float) -> float:
    """The |value| at or above which the top-k % entries lie."""
    flat = values.abs().flatten().to(torch.float32)
    n_keep = max(1, int(round(flat.numel() * k / 100.0)))
    if n_keep >= flat.numel():
        return 0.0
    return float(torch.topk(flat, n_keep, sorted=False).values.min())


def trim(delta: torch.Tensor, k: float, threshold: float | None = None) -> torch.Tensor:
    t = magnitude_threshold(delta, k) if threshold is None else threshold
    return delta * (delta.abs() >= t) if k < 100 else delta


def disjoint_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """(T, ...) trimmed deltas -> the mean over the tasks whose sign agrees with the elected sign."""
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    return (trimmed * agree).sum(0) / count


def keep_percent(default: float, help: str) -> HParam:
    """The TIES trim's k: percent of entries kept, in (0, 100], searched over 100, 90, …, 10."""
    return HParam(
        default, help, lambda v: 0 < v <= 100, "(0, 100]", grid=(100, 90, 80, 70, 60, 50, 40, 30, 20, 10)
    )


@merge_method(
    "ties",
    summary="trim to top-k % magnitudes, elect sign, disjoint mean",
    reference="Yadav et al., NeurIPS 2023, arXiv:2306.01708",
    hparams={
        "k": keep_percent(20.0, "percent of entries kept per task"),
        "scope": HParam(
            "tensor",
            "trim within each 'tensor' or over the whole 'model'",
            lambda v: v in ("tensor", "model"),
            "'tensor' or 'model'",
        ),
        "thresholds": HParam(
            None,
            "per-task magnitude thresholds (set by merge_updates for scope='model')",
            lambda v: v is None or isinstance(v, (list, tuple)),
            "null or a list",
        ),
    },
    identity={"k": 100.0},
)
def ties(deltas: list[torch.Tensor], k: float, scope: str, thresholds: list[float] | None) -> torch.Tensor:
    ths = thresholds if thresholds is not None else [None] * len(deltas)
    trimmed = torch.stack([trim(d.to(torch.float32), k, t) for d, t in zip(deltas, ths, strict=True)])
    return disjoint_mean(trimmed).to(deltas[0].dtype)
