"""Per-layer merge coefficients learned by distillation (ProDistill-style; Xu et al., "Scalable Model
Merging with Progressive Layer-wise Distillation", 2025; AdaMerging learns the same coefficients from
entropy instead). The merge is task arithmetic with one coefficient per member and per tensor,

    W_n = W0_n + Σ_i c_{i,n} · ΔW_{i,n},

and the coefficients are trained by gradient descent so that the merged backbone reproduces each
member's own fine-tuned backbone W0 + ΔW_i on ``N_SAMPLES`` unlabelled training inputs of its task
(mean squared error of the features, each task's term normalised by its teacher's mean square; Adam,
``BATCH`` samples per task a step). No
labels and no validation data are read while learning; this is end-to-end distillation, not the paper's
progressive layer-by-layer schedule.

Against Trap² this is the natural adaptive attack: the teacher of the protected member is the release at
its nominal scale, where it works, so the attacker can learn to keep that member at c ≈ 1 layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from trap2.errors import ConfigError

N_SAMPLES = 64
STEPS = 100
BATCH = 16  # samples per task in each step, drawn from the N_SAMPLES
LR = 0.02


def _features(backbone: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = functional_call(backbone, dict(params), (x,), strict=False)
    if not isinstance(out, torch.Tensor):
        raise ConfigError("prodistill: the backbone must return a tensor of features")
    return out.float()


def distill_coefficients(
    backbone: nn.Module,
    w0: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    init: float = 1.0,
    steps: int = STEPS,
    lr: float = LR,
    batch: int = BATCH,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str], list[float]]:
    """Learn c (members × tensors) from ``init``; returns (c, the tensor names, the loss per step).

    ``deltas[i]`` is member i's dense ΔW and ``inputs[i]`` its task's unlabelled inputs; the backbone is
    used as it is (put it in eval mode for a deterministic teacher)."""
    if len(deltas) != len(inputs) or not deltas:
        raise ConfigError("prodistill: one input batch per member is needed")
    names = list(dict.fromkeys(n for d in deltas for n in d))
    missing = [n for n in names if n not in w0]
    if missing:
        raise ConfigError(f"prodistill: {missing[0]!r} is not a parameter of the backbone")
    device = w0[names[0]].device  # everything runs where W0 lives
    inputs = [x.to(device) for x in inputs]
    with torch.no_grad():
        teachers = []
        for d, x in zip(deltas, inputs, strict=True):
            t = _features(backbone, {n: w0[n] + v.to(w0[n]) for n, v in d.items()}, x)
            teachers.append((t, t.pow(2).mean().clamp_min(1e-12)))
    zero = {n: torch.zeros_like(w0[n]) for n in names}
    stacked = {n: torch.stack([d.get(n, zero[n]).to(w0[n]) for d in deltas]) for n in names}  # (T, ...)
    coef = torch.full((len(deltas), len(names)), float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        picks = [torch.randperm(len(x), generator=gen)[:batch].to(device) for x in inputs]
        opt.zero_grad(set_to_none=True)
        params = {
            n: w0[n] + torch.tensordot(coef[:, j].to(w0[n].dtype), stacked[n], dims=1)
            for j, n in enumerate(names)
        }
        loss = sum(
            (_features(backbone, params, x[i]) - t[i]).pow(2).mean() / norm
            for x, i, (t, norm) in zip(inputs, picks, teachers, strict=True)
        ) / len(deltas)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return coef.detach().cpu(), names, history


def merged_delta(
    deltas: Sequence[Mapping[str, torch.Tensor]], coef: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Σ_i c_{i,n} ΔW_{i,n} per tensor n."""
    return {
        n: sum(float(coef[i, j]) * d[n] for i, d in enumerate(deltas) if n in d) for j, n in enumerate(names)
    }
