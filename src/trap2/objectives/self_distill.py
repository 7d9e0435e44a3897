"""Trap² by self-distillation: protect an update you already have, without labels.

The teacher is the given update at s = 1 (its outputs, computed once and frozen); the student starts
from the same update. With t the teacher's logits on an unlabelled input and f_s the student at
W0 + s·ΔW:

    J = T²·KL(softmax(t/T) ‖ softmax(f_1/T)) − λ·E_s[w(s)·b(CE(f_s, argmax t))]

s and w(s) as in the paper's objective (``trap2``: Jang et al., ICML 2026, Eq. 3, with ``law``,
``bound`` b, ``collateral`` μ and the hardening's ``operators`` as there: f_s is then
the student at W0 + op(ΔW) of the drawn operator): the nominal term keeps the student's predictions at s = 1
those of the teacher, the trap term makes them wrong at every other scale. Where the outputs are
features rather than a head's logits (``match='mse'``), the nominal term is MSE(f_1, t) and the trap
term pushes the scaled features away from the teacher's, b(MSE(f_s, t)) (give ``bound``: MSE has no
ceiling). ``y`` carries the teacher's outputs: (N, C) logits, or (N, L, V) token logits whose
positions are all counted.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.objectives.base import Loss, LossFn, StepStats
from trap2.objectives.trap2 import Trap2Objective
from trap2.scaling import ScaledModel

MATCHES = ("kl", "mse")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N, ...) values over the positions where ``mask`` (same shape) is nonzero; all if None."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dimension, mean over the rest
    (over the positions ``mask`` keeps, e.g. a token batch's attention mask (N, L))."""
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student outputs {tuple(student.shape)} but teacher outputs {tuple(teacher.shape)}"
        )
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (N, ...)
    return temperature**2 * _masked_mean(kl, mask)


def teacher_ce(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's top-1 class, mean over samples (and the
    positions ``mask`` keeps)."""
    target = teacher.argmax(-1)  # (N, ...)
    ce = F.cross_entropy(student.float().reshape(-1, student.shape[-1]), target.reshape(-1), reduction="none")
    return _masked_mean(ce.reshape(target.shape), mask)


class SelfDistillObjective(Trap2Objective):
    name = "trap2_distill"

    def __init__(
        self,
        cfg: ObjectiveConfig,
        match: str = "kl",
        temperature: float = 1.0,
        off_fraction: float = 1.0,
        off_every: int = 1,
        trap_steps: int | None = None,
    ) -> None:
        if match not in MATCHES:
            raise ConfigError(f"distillation match must be one of {', '.join(MATCHES)}; got {match!r}")
        if not temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        if not 0 < off_fraction <= 1:
            raise ConfigError(f"off_fraction must be in (0, 1], got {off_fraction}")
        if not isinstance(off_every, int) or off_every < 1:
            raise ConfigError(f"off_every must be an integer >= 1, got {off_every!r}")
        if trap_steps is not None and (not isinstance(trap_steps, int) or trap_steps < 0):
            raise ConfigError(f"trap_steps must be null or an integer >= 0, got {trap_steps!r}")
        super().__init__(cfg)
        self.match, self.temperature = match, temperature
        self.off_fraction, self.off_every = off_fraction, off_every
        # the off-nominal passes run in the first trap_steps steps only (None: on every step)
        self.trap_steps = trap_steps
        self.steps_seen = 0  # backward() calls so far: every off_every-th one runs the off-nominal passes

    def nominal_term(self, out: torch.Tensor, y: torch.Tensor, loss_fn: Loss | LossFn) -> torch.Tensor:
        """T²·KL to the teacher ``y`` (MSE with ``match='mse'``)."""
        if self.match == "mse":
            return F.mse_loss(out.float(), y.float())
        return distill_loss(out, y, self.temperature)

    def off_term(self, out: torch.Tensor, y: torch.Tensor, loss_fn: Loss | LossFn) -> torch.Tensor:
        """CE against the teacher's top-1 class (MSE to its features with ``match='mse'``)."""
        if self.match == "mse":
            return F.mse_loss(out.float(), y.float())
        return teacher_ce(out, y)

    def backward(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        gen: torch.Generator,
    ) -> StepStats:
        """``y``: the teacher's outputs for ``x``; ``loss_fn`` (the task's labelled loss) is not used.
        The step is Trap²'s (same scale draws, bound, collateral, dropout replay) with its two loss terms
        measured against the teacher."""
        if not y.is_floating_point():
            raise ConfigError("trap2_distill: y must be the teacher's outputs (float), not labels")
        self.steps_seen += 1
        if not self.traps(self.steps_seen):  # a nominal-only step: the teacher match alone
            nominal = self.nominal_term(model(x, 1.0), y, loss_fn)
            nominal.backward()
            return StepStats(loss=float(nominal.detach()), nominal=float(nominal.detach()))
        cfg = self.cfg
        self.cfg = self.trap_config(cfg)
        try:
            return super().backward(model, x, y, loss_fn, gen)
        finally:
            self.cfg = cfg

    # --- the step bookkeeping, shared with trap2.hf.Trap2ProtectTrainer ------------------------------

    def traps(self, step: int) -> bool:
        """Whether step ``step`` (1-based) runs the off-nominal passes: every ``off_every``-th step, within
        the first ``trap_steps`` (the rest are repair steps)."""
        return (self.trap_steps is None or step <= self.trap_steps) and step % self.off_every == 0

    def trap_config(self, cfg: ObjectiveConfig) -> ObjectiveConfig:
        """``cfg`` for a trap step: λ·off_every, so the trap weight per input seen is the same as with the
        off-nominal passes on every step (``cfg`` itself when off_every = 1); a ``balance`` cap ρ becomes
        ρ·off_every too, or it would cap the larger trap step back to ρ and undo the λ scaling."""
        if self.off_every == 1:
            return cfg
        balance = None if cfg.balance is None else cfg.balance * self.off_every
        return dataclasses.replace(cfg, lam=cfg.lam * self.off_every, balance=balance)

    def off_size(self, n: int) -> int:
        """How many of a batch's ``n`` inputs the off-nominal passes see: the first ``off_fraction``, at
        least one."""
        return max(1, round(n * self.off_fraction))

    def off_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``off_fraction`` of the batch (at least one input): the batch is already shuffled."""
        n = self.off_size(len(x))
        return x[:n], y[:n]
