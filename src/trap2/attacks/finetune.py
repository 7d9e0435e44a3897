"""The attacker's fine-tuning step, shared by the grid's attacks (recovery, un-trapping, distillation):
one setting of learning rate × steps × samples per task × LoRA or full × optimiser × seed
(:class:`AttackPoint`), and :func:`fit_delta`, which trains a delta on top of a frozen base with a loss
the attack supplies.

The delta the attack trains is ``base + trainable``: ``base`` a fixed dense ΔW (the merge being
recovered, or nothing), ``trainable`` either a dense tensor per parameter (full) or a LoRA branch
scaling·B@A per 2-D parameter (LoRA; 1-D parameters stay at their base). A LoRA branch starts from given
factors (the released update's own) or fresh (A ~ U(±1/√in), B = 0: the branch starts at zero, as PEFT's
LoRA does). Gradients are clipped to norm 1; AdamW runs without weight decay, SGD with momentum 0.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trap2.errors import ConfigError
from trap2.updates import LowRank

MODES = ("lora", "full")
OPTIMISERS = ("adamw", "sgd")
RANK = 8
BATCH = 16  # samples per task in each step (fewer when the budget is smaller)


@dataclass(frozen=True)
class AttackPoint:
    """One attacker setting: ``samples`` per task (labelled for recovery and un-trapping, unlabelled for
    distillation), ``steps`` optimiser steps at learning rate ``lr``, a LoRA branch of rank ``rank`` or
    every weight (``mode``), AdamW or SGD with momentum (``optimiser``), and the seed of the batches."""

    lr: float
    steps: int
    samples: int
    mode: str = "full"
    optimiser: str = "adamw"
    seed: int = 0
    rank: int = RANK

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"attack mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.optimiser not in OPTIMISERS:
            raise ConfigError(f"attack optimiser {self.optimiser!r} is not one of {', '.join(OPTIMISERS)}")
        if (
            not (self.lr > 0 and math.isfinite(self.lr))
            or self.steps < 0
            or self.samples < 1
            or self.rank < 1
        ):
            raise ConfigError(
                f"attack point: lr={self.lr} must be > 0, steps={self.steps} ≥ 0, samples={self.samples} ≥ 1"
                f" and rank={self.rank} ≥ 1"
            )

    @property
    def batch(self) -> int:
        return min(self.samples, BATCH)

    def record(self) -> dict[str, float | int | str]:
        return {
            "lr": self.lr, "steps": self.steps, "samples": self.samples, "mode": self.mode,
            "optimiser": self.optimiser, "seed": self.seed,
        }  # fmt: skip


Loss = Callable[[Callable[[float], dict[str, torch.Tensor]], int], torch.Tensor]


def fit_delta(
    w0: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    names: list[str],
    point: AttackPoint,
    loss: Loss,
    init: Mapping[str, torch.Tensor | LowRank] | None = None,
) -> dict[str, torch.Tensor | LowRank]:
    """Train ``trainable`` for ``point.steps`` steps; return base + trainable over ``names`` (a LoRA
    branch on a tensor without base stays LowRank; everything else dense).

    ``loss(params_at, step)`` is the attack's scalar loss; ``params_at(s)`` gives W0 + s·(base +
    trainable) for the tensors in ``names`` (the tensors the attack may touch). ``init``: the trainable
    part's starting value per name (a dense tensor, or LowRank factors for a LoRA branch); default zero
    (a fresh branch under LoRA)."""
    init = init or {}
    device = next(iter(w0.values())).device
    gen = torch.Generator().manual_seed(point.seed)
    dense: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}  # a given branch's own factor shapes
    for n in names:
        shape = w0[n].shape
        given = init.get(n)
        if point.mode == "lora" and isinstance(given, LowRank):
            a, b = given.A.reshape(given.rank, -1), given.B.reshape(given.B.shape[0], -1)
            shapes[n] = (given.A.shape, given.B.shape)
            # copies: the optimiser steps in place, and the given factors are the release's own tensors
            factors[n] = (
                a.float().to(device).clone(),
                b.float().to(device).clone(),
                given.scaling,
                given.fan_in_fan_out,
            )
        elif point.mode == "lora" and len(shape) == 2:
            if given is not None:  # a dense start under LoRA: it joins the frozen base
                base = {**base, n: base.get(n, torch.zeros_like(w0[n])) + given.to(w0[n])}
            bound = 1.0 / math.sqrt(shape[1])
            a = (torch.rand(point.rank, shape[1], generator=gen) * 2 - 1) * bound
            factors[n] = (a.to(device), torch.zeros(shape[0], point.rank, device=device), 1.0, False)
        elif point.mode == "lora":  # a 1-D tensor: no branch; a given start joins the base
            if given is not None:
                dense_start = given.dense() if isinstance(given, LowRank) else given
                base = {**base, n: base.get(n, torch.zeros_like(w0[n])) + dense_start.to(w0[n])}
        else:
            start = given.dense() if isinstance(given, LowRank) else given
            dense[n] = (start.to(w0[n]) if start is not None else torch.zeros_like(w0[n])).clone()
    leaves = [t.requires_grad_(True) for t in dense.values()]
    for a, b, _s, _f in factors.values():
        leaves += [a.requires_grad_(True), b.requires_grad_(True)]
    base_dev = {n: t.to(w0[n]) for n, t in base.items()}

    def trainable(n: str) -> torch.Tensor | None:
        if n in dense:
            return dense[n]
        if n in factors:
            a, b, scaling, fifo = factors[n]
            d = (b @ a) * scaling
            return (d.T if fifo else d).reshape(w0[n].shape)  # conv kernels: back to (out, in, kh, kw)
        return None

    def params_at(s: float) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            d, t = base_dev.get(n), trainable(n)
            total = d if t is None else (t if d is None else d + t)
            out[n] = w0[n] if total is None else w0[n] + s * total
        return out

    if point.optimiser == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(leaves, lr=point.lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(leaves, lr=point.lr, momentum=0.9)
    for step in range(point.steps):
        opt.zero_grad(set_to_none=True)
        value = loss(params_at, step)
        if not torch.isfinite(value):
            break  # a diverged run keeps its last finite weights
        value.backward()
        torch.nn.utils.clip_grad_norm_(leaves, 1.0)
        opt.step()
    out: dict[str, torch.Tensor | LowRank] = {}
    for n in names:
        d, t = base_dev.get(n), trainable(n)
        if n in factors and d is None:  # a pure LoRA branch stays low-rank
            a, b, scaling, fifo = factors[n]
            a_shape, b_shape = shapes.get(n, (a.shape, b.shape))
            out[n] = LowRank(a.detach().reshape(a_shape), b.detach().reshape(b_shape), scaling, fifo)
        elif d is not None or t is not None:
            out[n] = (d if t is None else (t if d is None else d + t)).detach().float()
    return out


def dense_of(delta: Mapping[str, torch.Tensor | LowRank]) -> dict[str, torch.Tensor]:
    """A delta with LoRA branches as dense tensors (float32)."""
    return {n: t.dense() if isinstance(t, LowRank) else t.float() for n, t in delta.items()}
