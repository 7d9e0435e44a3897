"""Chain of Merges (Buzzega et al., "Rethinking Layer-wise Model Merging through Chain of Merges", 2025;
the data-dependent threat of the Trap² paper's Table 5): RegMean layer by layer in forward order, each
layer's input statistics recomputed in the model whose earlier layers are already merged,

    W*_l = (Σ_i Ĝ_i^l)⁻¹ Σ_i Ĝ_i^l W_i^l,   Ĝ_i^l = X̂_i^lᵀ X̂_i^l (off-diagonal × α, as in RegMean),

where X̂_i^l is layer l's input on ``n_samples`` unlabelled training inputs of member i's task, with
every tensor of a module run before layer l at its merged value and the rest at member i's own (they do
not touch X̂_i^l). The first layer's statistics are RegMean's; each later one sees the shift that the
merges before it caused, which RegMean (statistics from each member's own model) ignores. Tensors of
other modules (biases, norms, embeddings) are averaged, as in RegMean, and enter the chain at their
merged value. Cost: one forward per linear layer and member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from trap2.attacks.regmean import ALPHA, _linear_like, input_grams, regmean_weight
from trap2.errors import ConfigError
from trap2.updates import apply_delta


@torch.no_grad()
def module_order(backbone: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[str, int]:
    """{module name: position of its first call} in one forward pass at ``params``."""
    order: dict[str, int] = {}

    def record(name: str) -> None:  # a pre-hook returning a value would replace the module's input
        order.setdefault(name, len(order))

    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, n=name: record(n))
        for name, module in backbone.named_modules()
    ]
    try:
        functional_call(backbone, dict(params), (x,), strict=False)
    finally:
        for h in hooks:
            h.remove()
    return order


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def chain_of_merges_delta(
    backbone: nn.Module,
    w0: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    alpha: float = ALPHA,
) -> dict[str, torch.Tensor]:
    """The Chain-of-Merges merge of ``deltas`` (one per member, with its task's ``inputs``) as a delta
    from W0."""
    if len(deltas) != len(inputs):
        raise ConfigError("chain_of_merges: one batch of inputs per member is needed")
    names = list(dict.fromkeys(n for d in deltas for n in d))
    device = next(iter(w0.values())).device  # everything runs where W0 lives
    inputs = [x.to(device) for x in inputs]
    members = {n: [d[n].to(w0[n]) if n in d else torch.zeros_like(w0[n]) for d in deltas] for n in names}
    merged = {n: sum(ms) / len(ms) for n, ms in members.items()}  # the average, until a layer is merged
    modules = dict(backbone.named_modules())
    order = module_order(backbone, w0, inputs[0])
    late = len(order)  # a module never called comes after every layer
    position = {n: order.get(_module_of(n), late) for n in names}
    layers = sorted(
        (
            n
            for n in names
            if n.endswith("weight")
            and _linear_like(modules.get(_module_of(n), nn.Identity()))
            and members[n][0].dim() in (2, 4)
            and _module_of(n) in order
        ),
        key=lambda n: position[n],
    )
    for layer in layers:
        k = position[layer]
        grams = []
        for i, x in enumerate(inputs):
            state = {n: merged[n] if position[n] < k else members[n][i] for n in names}
            grams.append(input_grams(backbone, apply_delta(w0, state), x, {layer})[layer])
        shape = w0[layer].shape
        ws = [(w0[layer] + m).reshape(shape[0], -1) for m in members[layer]]
        merged[layer] = regmean_weight(ws, grams, alpha).reshape(shape) - w0[layer]
    return {n: t.cpu() for n, t in merged.items()}
