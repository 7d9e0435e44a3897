"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry of ΔW_i with
probability p and rescale the survivors by 1/(1−p), then sum (``dare``) or merge with TIES (``dare_ties``).

Masks are reproducible and independent of input order: the per-tensor seed comes from the run seed
and the tensor's name, and each task's mask from that seed and the task's own input tensor (its bytes),
not its position in the list. ``merge_updates`` computes these member seeds from the raw inputs and passes
them as ``seeds``, so the masks stay the same inside a space (KnOTS) whose factors differ by rounding.
"""

from __future__ import annotations

import hashlib

import torch

from trap2.merging.registry import HParam, merge_method
from trap2.merging.ties import disjoint_mean, keep_percent, trim

P_GRID = (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


def content_seed(seed: int, *tensors: torch.Tensor) -> int:
    """``seed`` mixed with a hash of the tensors' values. Half-precision tensors are hashed as their exact
    float32 values (numpy has no bfloat16), so a bf16 or fp16 update and its float32 copy draw the same
    masks; float32 inputs hash their own bytes, as they always have."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(torch.float32)  # exact: every half value is a float32 value
        h.update(t.contiguous().numpy().tobytes())
    return (seed ^ int.from_bytes(h.digest(), "little")) & 0x7FFF_FFFF_FFFF_FFFF


def _member_seeds(deltas: list[torch.Tensor], seed: int, seeds: list[int] | None) -> list[int]:
    return list(seeds) if seeds is not None else [content_seed(seed, d) for d in deltas]


def drop_and_rescale(delta: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0:
        return delta
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(delta.shape, generator=gen) >= p
    return delta * keep.to(delta.device) / (1.0 - p)


_P = HParam(0.5, "drop rate p", lambda v: 0 <= v < 1, "[0, 1)", grid=P_GRID)
_SEED = HParam(0, "run seed (combined with each tensor's name)", lambda v: isinstance(v, int), "an integer")
_SEEDS = HParam(
    None,
    "per-member seeds (set by merge_updates from the raw inputs)",
    lambda v: v is None or isinstance(v, (list, tuple)),
    "null or a list",
)


@merge_method(
    "dare",
    summary="random drop with rate p, rescale by 1/(1-p), sum",
    reference="Yu et al., ICML 2024, arXiv:2311.03099",
    hparams={"p": _P, "seed": _SEED, "seeds": _SEEDS},
    identity={"p": 0.0},
)
def dare(deltas: list[torch.Tensor], p: float, seed: int, seeds: list[int] | None) -> torch.Tensor:
    ms = _member_seeds(deltas, seed, seeds)
    out = torch.stack(
        [drop_and_rescale(d.to(torch.float32), p, s) for d, s in zip(deltas, ms, strict=True)]
    ).sum(0)
    return out.to(deltas[0].dtype)


@merge_method(
    "dare_ties",
    summary="DARE on each delta, then TIES (trim top-k %, elect sign, disjoint mean)",
    reference="Yu et al., ICML 2024, arXiv:2311.03099; Yadav et al., NeurIPS 2023",
    hparams={
        "p": _P,
        "k": keep_percent(100.0, "percent kept by the TIES trim after DARE"),
        "seed": _SEED,
        "seeds": _SEEDS,
    },
    identity={"p": 0.0, "k": 100.0},
)
def dare_ties(
    deltas: list[torch.Tensor], p: float, k: float, seed: int, seeds: list[int] | None
) -> torch.Tensor:
    ms = _member_seeds(deltas, seed, seeds)
    dropped = [drop_and_rescale(d.to(torch.float32), p, s) for d, s in zip(deltas, ms, strict=True)]
    return disjoint_mean(torch.stack([trim(d, k) for d in dropped])).to(deltas[0].dtype)
