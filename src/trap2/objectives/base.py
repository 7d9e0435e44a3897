"""The objective interface: compute the loss of one mini-batch and accumulate its gradient.

Objectives take the task's loss (``Task.loss``, e.g. ``CrossEntropy`` over token logits with ignored
positions): called, the batch mean; its ``per_sample`` gives the (N,) losses that objectives weighting
samples one by one need. A bare mean loss function (e.g. ``F.cross_entropy``) is accepted too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.scaling import ScaledModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> the batch mean


@runtime_checkable
class Loss(Protocol):
    """A task's loss: ``loss(logits, y)`` the batch mean, ``loss.per_sample(logits, y)`` (N,)."""

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def per_sample_loss(loss_fn: Loss | LossFn, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) one loss per sample: ``loss_fn.per_sample``, or a bare mean loss applied to each sample alone."""
    if isinstance(loss_fn, Loss):
        out = loss_fn.per_sample(logits, y)
    else:
        out = torch.stack([loss_fn(logits[i : i + 1], y[i : i + 1]) for i in range(y.shape[0])])
    if out.shape != (y.shape[0],):
        raise ConfigError(f"a per-sample loss must have shape ({y.shape[0]},), got {tuple(out.shape)}")
    return out


@dataclass
class StepStats:
    """What one step computed, for logging. ``loss`` is the objective J itself."""

    loss: float
    nominal: float
    off_nominal: float | None = None
    scales: list[float] = field(default_factory=list)
    disruption: float | None = None  # mean 1 − cos(features off scale, features at W0), if measured


class Objective(Protocol):
    name: str

    def backward(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        gen: torch.Generator,
    ) -> StepStats:
        """Run the forward pass(es), call ``backward`` (gradients accumulate), return the stats.
        ``loss_fn``: the task's loss (``Task.loss``)."""
        ...


ObjectiveFactory = Callable[[ObjectiveConfig], Objective]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def same_random_draws(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield ``replay()``, which rewinds the RNG to where it was on entry (same dropout masks).

    Every pass inside the block draws the same numbers from the same start, so the RNG leaves the
    block where one pass leaves it: a protected run draws the same dropout masks, step after step, as
    the plain run it is compared with.
    """
    entry = _rng_state(device)
    yield lambda: _set_rng_state(entry, device)
