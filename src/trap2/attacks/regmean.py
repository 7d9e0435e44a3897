"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023): a
data-dependent merge. For each linear layer (and 1×1 convolution) it takes the weights that best
reproduce every member's own layer outputs on a few of its task's inputs,

    W* = argmin_W Σ_i ‖X_i W − X_i W_i‖²  =  (Σ_i G_i)⁻¹ Σ_i G_i W_i,   G_i = X_iᵀ X_i,

with the off-diagonal of each G_i scaled by α (the paper's regularisation, α = 0.9 there); every other
parameter is averaged. ``X_i`` is the layer input inside member i's own fine-tuned model, on
``n_samples`` unlabelled training inputs of its task. Weights are stored (out, in), so the kernel works
on their transposes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from trap2.errors import ConfigError
from trap2.updates import apply_delta

ALPHA = 0.9
N_SAMPLES = 64


def regmean_weight(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = ALPHA
) -> torch.Tensor:
    """The kernel: ``weights`` (out, in) per member and their input Gram matrices (in, in) → W* (out, in)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean: alpha={alpha} must lie in [0, 1]")
    if len(weights) != len(grams) or not weights:
        raise ConfigError("regmean: one Gram matrix per member weight is needed")
    device = grams[0].device
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64, device=device)
    for w, g in zip(weights, grams, strict=True):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        total += g
        rhs += g @ w.to(device, torch.float64).T
    eye = torch.eye(total.shape[0], dtype=torch.float64, device=device)
    ridge = 1e-8 * float(torch.diagonal(total).mean().clamp_min(1e-12))
    return torch.linalg.solve(total + ridge * eye, rhs).T.to(weights[0].dtype)


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


@torch.no_grad()
def input_grams(
    backbone: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, names: set[str]
) -> dict[str, torch.Tensor]:
    """Gram matrices of the inputs to each linear-like module whose weight is in ``names``, with the
    backbone at ``params``."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name, module in backbone.named_modules():
        weight = f"{mod_name}.weight" if mod_name else "weight"
        if weight not in names or not _linear_like(module):
            continue

        def hook(_m: nn.Module, args: tuple, _out: object, key: str = weight) -> None:
            inp = args[0]
            flat = (
                inp.movedim(1, -1).reshape(-1, inp.shape[1])
                if inp.dim() == 4
                else inp.reshape(-1, inp.shape[-1])
            )
            flat = flat.double()
            grams[key] = grams.get(key, 0) + flat.T @ flat

        hooks.append(module.register_forward_hook(hook))
    try:
        functional_call(backbone, dict(params), (x,), strict=False)
    finally:
        for h in hooks:
            h.remove()
    return grams


def regmean_delta(
    backbone: nn.Module,
    w0: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    alpha: float = ALPHA,
) -> dict[str, torch.Tensor]:
    """The RegMean merge of ``deltas`` (one per member, with its task's ``inputs``) as a delta from W0."""
    if len(deltas) != len(inputs):
        raise ConfigError("regmean: one batch of inputs per member is needed")
    names = set().union(*(d.keys() for d in deltas))
    device = next(iter(w0.values())).device  # everything runs where W0 lives
    grams = [
        input_grams(backbone, apply_delta(w0, d), x.to(device), names)
        for d, x in zip(deltas, inputs, strict=True)
    ]
    merged: dict[str, torch.Tensor] = {}
    for n in names:
        members = [d[n].to(w0[n]) if n in d else torch.zeros_like(w0[n]) for d in deltas]
        if all(n in g for g in grams) and members[0].dim() in (2, 4):
            shape = members[0].shape
            ws = [(w0[n] + m).reshape(shape[0], -1) for m in members]
            new = regmean_weight(ws, [g[n] for g in grams], alpha).reshape(shape)
            merged[n] = (new - w0[n]).cpu()
        else:
            merged[n] = (sum(members) / len(members)).cpu()
    return merged
