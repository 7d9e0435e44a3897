"""Trap² (Jang et al., ICML 2026): J = L(W0+ΔW) − λ·E_s[w(s)·L(W0+s·ΔW)].

s ~ U([s_min, 1−δ] ∪ [1+δ, s_max]) (length-weighted over the two intervals, the same law as the
paper's rejection sampling; ``law = 'log'``, an extension, draws log s uniformly instead),
w(s) ∈ {1/s, 1/√s, 1}. Two forward and two backward passes per step on the same mini-batch with the
same dropout mask; the gradients accumulate. With ``bound = τ`` the off-nominal
loss enters as τ·tanh(L/τ), which keeps −λ·w·L from running away once the trap has formed.

``collateral = μ > 0`` (an extension, not in the paper) adds μ·D(s) to the off-nominal term, with
D(s) = mean over the batch of 1 − cos(f_{W0+sΔW}(x), f_{W0}(x)), f the backbone's features (the
input of the frozen head) and f_{W0} from a third, gradient-free pass at s = 0. The paper's term
only makes the protected task wrong off scale; a merge of many tasks then still serves the others.
D pushes the whole representation away from the pretrained one, which every other task's head was
built on. D ∈ [0, 2], so it cannot run away.

``balance = ρ`` (an extension, not in the paper) scales the trap terms' summed gradient down to at most
ρ × the nominal term's gradient norm in each step (g = g_nom + min(1, ρ·‖g_nom‖/‖g_trap‖)·g_trap), so
AdamW's per-entry scale is not the trap term's alone once its gradient dwarfs the nominal one. J's
reported value is unchanged; ``None`` (the default) is the paper's plain sum.

Hardening (extensions, not in the paper; docs/hardening.md): ``operators`` draws each off-nominal
model from a family of operators beyond s·ΔW (per-layer scales, trims, spectral reweighting:
``trap2.objectives.operators``), and ``lookahead_steps`` measures each trap term after the attacker's
first steps on the batch (``trap2.objectives.lookahead``). With their defaults (``operators='scale'``,
no lookahead) the step is the paper's, draw for draw and bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.objectives.base import Loss, LossFn, StepStats, same_random_draws
from trap2.objectives.lookahead import lookahead
from trap2.scaling import ScaledModel

if typing.TYPE_CHECKING:
    from trap2.objectives.operators import Draw


def sample_scales(cfg: ObjectiveConfig, n: int, gen: torch.Generator) -> list[float]:
    """n draws from U([s_min, 1−δ] ∪ [1+δ, s_max]), or with ``law='log'`` from the same union uniform
    in log s (each interval weighted by its length in log s)."""
    warp, unwarp = (math.log, math.exp) if cfg.law == "log" else (float, float)
    a, b, c, d = (warp(v) for v in (cfg.s_min, 1.0 - cfg.delta, 1.0 + cfg.delta, cfg.s_max))
    low, high = b - a, d - c
    u = torch.rand(n, generator=gen, dtype=torch.float64) * (low + high)
    return [unwarp(a + v if v < low else c + (v - low)) for v in u.tolist()]


def scale_weight(kind: str, s: float) -> float:
    if kind == "inv":
        return 1.0 / s
    if kind == "inv_sqrt":
        return 1.0 / math.sqrt(s)
    return 1.0


def bounded(loss: torch.Tensor, tau: float | None) -> torch.Tensor:
    return loss if tau is None else tau * torch.tanh(loss / tau)


def disruption(features: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """mean(1 − cos) between two feature tensors along their last dimension (0 = same directions)."""
    dtype = torch.promote_types(features.dtype, torch.float32)  # half precision is summed in float32
    return (1.0 - F.cosine_similarity(features.to(dtype), base.to(dtype), dim=-1)).mean()


@contextlib.contextmanager
def feature_tap(model: ScaledModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, the list receives the backbone's output (the head's input) of every forward;
    a model without a ``backbone`` gives its own output."""
    seen: list[torch.Tensor] = []
    module = getattr(model.model, "backbone", model.model)

    def hook(_module: nn.Module, _inputs: object, output: Any) -> None:
        seen.append(output if isinstance(output, torch.Tensor) else output[0])

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_tap(_model: ScaledModel) -> Iterator[list[torch.Tensor]]:
    """``feature_tap``'s stand-in where nothing reads the features: no hook, nothing kept."""
    yield []


class Trap2Objective:
    name = "trap2"
    sign = -1.0  # J = L(1) − λ·w(s)·L(s): accurate at s = 1, wrong elsewhere

    def __init__(self, cfg: ObjectiveConfig) -> None:
        self.cfg = cfg

    def nominal_term(self, out: torch.Tensor, y: torch.Tensor, loss_fn: Loss | LossFn) -> torch.Tensor:
        """L at s = 1 (a subclass may measure it another way: ``trap2_distill`` against a teacher)."""
        return loss_fn(out, y)

    def off_term(self, out: torch.Tensor, y: torch.Tensor, loss_fn: Loss | LossFn) -> torch.Tensor:
        """L at an off-nominal s, before the bound and the weight."""
        return loss_fn(out, y)

    def off_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of the batch the off-nominal passes see (all of it; ``trap2_distill`` may take fewer)."""
        return x, y

    def backward(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        gen: torch.Generator,
    ) -> StepStats:
        from trap2.objectives.operators import draw_operators

        cfg = self.cfg
        draws = draw_operators(cfg, model, cfg.n_samples, gen)  # 'scale' alone: sample_scales, as the paper
        params = [p for p in model.model.parameters() if p.requires_grad] if cfg.lookahead_steps else []
        # The tap keeps each backbone output it sees alive (B×L×V logits on a language model): it is
        # registered only around the passes whose output D(s) reads, and only when μ > 0.
        tapped = feature_tap if cfg.collateral else _no_tap
        with same_random_draws(x.device) as replay:
            nominal = self.nominal_term(model(x, 1.0), y, loss_fn)
            nominal.backward()
            held = _hold_grads(model) if cfg.balance is not None else None
            j = float(nominal.detach())
            x, y = self.off_batch(x, y)
            if cfg.collateral:
                replay()
                with torch.no_grad(), feature_tap(model) as seen:
                    model(x, 0.0)
                base = seen[-1].detach()
            off_values, disrupted = [], []
            for d in draws:
                with self._lookahead(model, x, y, loss_fn, d, params, replay):
                    replay()
                    with tapped(model) as seen:
                        off = self.off_term(_forward(model, x, d), y, loss_fn)
                    trap = bounded(off, cfg.bound)
                    if cfg.collateral:
                        dis = disruption(seen[-1], base)
                        trap = trap + cfg.collateral * dis
                        disrupted.append(float(dis.detach()))
                    del seen
                    term = (self.sign * cfg.lam * scale_weight(cfg.weight, d.s) / len(draws)) * trap
                    term.backward()
                j += float(term.detach())
                off_values.append(float(off.detach()))
        if held is not None:
            balance_grads(model, held, cfg.balance)
        return StepStats(
            loss=j,
            nominal=float(nominal.detach()),
            off_nominal=sum(off_values) / len(off_values),
            scales=[d.s for d in draws],
            disruption=sum(disrupted) / len(disrupted) if disrupted else None,
        )

    def _lookahead(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        d: Draw,
        params: list[torch.nn.Parameter],
        replay: typing.Callable[[], None],
    ) -> contextlib.AbstractContextManager[None]:
        """Within the block the update is the attacker's after ``lookahead_steps`` steps against draw
        ``d`` (nothing changes without a lookahead)."""
        return lookahead(
            self.cfg,
            params,
            lambda: self.off_term(_forward(model, x, d), y, loss_fn),
            lambda: self.nominal_term(model(x, 1.0), y, loss_fn),
            replay,
        )


def _hold_grads(model: ScaledModel) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Take the nominal term's gradients out of ``.grad`` (the trap terms' then accumulate alone)."""
    held = {}
    for p in model.model.parameters():
        if p.grad is not None:
            held[p] = p.grad
            p.grad = None
    return held


def balance_factor(nominal_norm: torch.Tensor, trap_norm: torch.Tensor, rho: float) -> torch.Tensor:
    """min(1, ρ·‖g_nominal‖ / ‖g_trap‖): the trap gradient's scale under ``balance`` (1 when it is 0)."""
    return torch.clamp(rho * nominal_norm / trap_norm.clamp(min=torch.finfo(torch.float32).tiny), max=1.0)


def balance_grads(model: ScaledModel, held: dict[torch.nn.Parameter, torch.Tensor], rho: float) -> None:
    """``.grad`` = g_nominal + min(1, ρ·‖g_nominal‖/‖g_trap‖)·g_trap, with g_nominal the ``held`` gradients
    and g_trap what the trap terms' backward left in ``.grad``."""
    params = [p for p in model.model.parameters() if p.grad is not None or p in held]
    trap = [p.grad for p in params if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm
    factor = balance_factor(total_norm(list(held.values())), total_norm(trap), rho)
    for p in params:
        g = held.get(p)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.mul_(factor.to(p.grad.device, p.grad.dtype))
            if g is not None:
                p.grad.add_(g)


def _forward(model: ScaledModel, x: torch.Tensor, d: Draw) -> torch.Tensor:
    """The model's output at the draw's operator: W0 + s·ΔW (the paper's), or W0 + op(ΔW)."""
    if d.transforms is None:
        return model(x, d.s)
    with model.transformed(d.transforms):
        return model.model(x)


class FlattenObjective(Trap2Objective):
    """The attacker's inverse of Trap²: J = L(1) + λ·w(s)·L(s), accurate at every scale. Used to
    "un-trap" a released update (``trap2.attacks.untrap``) before merging it."""

    name = "flatten"
    sign = 1.0

    def __init__(self, cfg: ObjectiveConfig) -> None:
        if cfg.collateral:
            raise ConfigError(
                "objective.collateral is a Trap² knob; flatten (un-trapping) would pull features towards W0's"
            )
        if cfg.lookahead_steps:
            raise ConfigError(
                "objective.lookahead_steps is a Trap² knob (it anticipates an attacker like flatten)"
            )
        if cfg.balance is not None:
            raise ConfigError(
                "objective.balance is a Trap² knob (it keeps the trap from dwarfing the nominal)"
            )
        super().__init__(cfg)
