"""Trap² in one pass ("split batch"): part of each mini-batch at the nominal scale, the rest at
off-nominal scales, one forward and one backward.

J = L(nominal part) − λ · mean_{j ∈ off} w(s_j)·b(L_j), with s_j drawn as in ``trap2`` (per sample for
LoRA, one per step for full fine-tuning), b the optional soft cap, L the task's loss (its batch mean on
the nominal part) and L_j its per-sample form (for token-level losses the mean over sample j's counted
tokens, ignored ones left out). Cost ≈ one plain step; the nominal term sees ``1 − off_fraction`` of
the batch.
"""

from __future__ import annotations

import math

import torch

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.objectives.base import Loss, LossFn, StepStats, per_sample_loss
from trap2.objectives.trap2 import bounded, sample_scales, scale_weight
from trap2.scaling import ScaledModel

OFF_FRACTION = 0.5


class SplitTrap2Objective:
    name = "trap2_split"

    def __init__(self, cfg: ObjectiveConfig, off_fraction: float = OFF_FRACTION) -> None:
        if cfg.collateral:
            raise ConfigError("objective.collateral is implemented by the two-pass 'trap2' objective only")
        if cfg.balance is not None:
            raise ConfigError(
                "objective.balance needs the nominal and trap gradients apart: the two-pass 'trap2' objective"
            )
        if cfg.hardened:
            raise ConfigError(
                "objective.operators and objective.lookahead_steps are implemented by the two-pass 'trap2' "
                "objective only"
            )
        self.cfg = cfg
        self.off_fraction = off_fraction

    def backward(
        self,
        model: ScaledModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Loss | LossFn,
        gen: torch.Generator,
    ) -> StepStats:
        cfg = self.cfg
        n_off = min(x.shape[0] - 1, math.floor(x.shape[0] * self.off_fraction))
        n_nom = x.shape[0] - n_off
        k = n_off if model.kind == "lora" else 1
        scales = sample_scales(cfg, max(k, 1), gen) if n_off else []
        s_vec = torch.tensor(scales, dtype=torch.float32)
        if model.kind != "lora" and n_off:
            s_vec = s_vec.expand(n_off)
        logits = model.forward_split(x, n_nom, s_vec) if n_off else model(x)
        nominal = loss_fn(logits[:n_nom], y[:n_nom])
        j = nominal
        off_mean = None
        if n_off:
            per_sample = per_sample_loss(loss_fn, logits[n_nom:], y[n_nom:])  # (n_off,)
            w = torch.tensor(  # at least float32, and float64 for a float64 loss
                [scale_weight(cfg.weight, s) for s in s_vec.tolist()],
                dtype=torch.promote_types(per_sample.dtype, torch.float32),
                device=per_sample.device,
            )
            j = nominal - cfg.lam * (w * bounded(per_sample, cfg.bound)).mean()
            off_mean = float(per_sample.detach().mean())
        j.backward()
        return StepStats(
            loss=float(j.detach()),
            nominal=float(nominal.detach()),
            off_nominal=off_mean,
            scales=s_vec.tolist(),
        )
