"""Where a Transformer's attention and MLP weights live in its state dict (BERT, ViT — transformers 4 and 5
naming — CLIP, and trap2's digits ViT)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trap2.errors import ConfigError

# prefix pattern → (q, k, v, o, mlp in, mlp out) module names under the layer prefix
LAYOUTS: dict[str, tuple[str, str, str, str, str, str]] = {
    "bert": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
    "vit-v5": (
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
    ),
    "vit": (
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
    "clip": (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ),
    "digits-vit": ("attn.q", "attn.k", "attn.v", "attn.o", "fc1", "fc2"),  # trap2's own DigitsViT
}
_LAYER = re.compile(r"^(.*?(?:layer|layers|blocks)\.\d+)\.")


@dataclass(frozen=True)
class AttentionLayer:
    """Full weight names (without ``.weight`` / ``.bias``) of one Transformer layer."""

    q: str
    k: str
    v: str
    o: str
    fc_in: str
    fc_out: str
    n_heads: int


def find_layers(state: Mapping[str, torch.Tensor], n_heads: int) -> list[AttentionLayer]:
    """Every Transformer layer in ``state``; an error for models with none (e.g. CNNs)."""
    prefixes = dict.fromkeys(m.group(1) for n in state if (m := _LAYER.match(n)))
    layers = []
    for p in prefixes:
        for names in LAYOUTS.values():
            full = [f"{p}.{n}" for n in names]
            if all(f"{f}.weight" in state for f in full):
                layers.append(AttentionLayer(*full, n_heads=n_heads))
                break
    if not layers:
        raise ConfigError(
            "PaRaMS and Merge-Lock reparameterise Transformer attention heads and MLPs: no BERT/ViT/CLIP-style "
            "attention layers found (a CNN has none; its update cannot be protected this way)"
        )
    hidden = state[f"{layers[0].q}.weight"].shape[0]
    if hidden % n_heads:
        raise ConfigError(f"{n_heads} heads do not divide the hidden size {hidden}")
    return layers


def head_slices(layer: AttentionLayer, state: Mapping[str, torch.Tensor]) -> list[slice]:
    d = state[f"{layer.q}.weight"].shape[0] // layer.n_heads
    return [slice(h * d, (h + 1) * d) for h in range(layer.n_heads)]
