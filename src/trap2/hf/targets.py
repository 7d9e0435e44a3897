"""Default LoRA targets per Hugging Face architecture, and a ``LoraConfig`` built from them.

The defaults follow the paper's recipe (attention projections and MLP layers; for CNNs the 1×1
"pointwise" layers, which ConvNeXt implements as ``nn.Linear``); heads are never targeted, they stay
frozen like CLIP's zero-shot heads. Any model type not listed falls back to every ``nn.Linear`` except
the output heads. Override with ``target_modules=``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trap2.errors import ConfigError

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "clip_vision_model": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    # ViT's module names before transformers 5, then from 5 on (PEFT needs only some to match)
    "vit": (
        *("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        *("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    ),
    "convnext": ("pwconv1", "pwconv2"),
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
HEAD_NAMES = ("classifier", "lm_head", "score", "pooler", "head", "visual_projection", "text_projection")


def default_lora_targets(model: nn.Module) -> list[str]:
    """LoRA target module names for ``model`` (a transformers model, or any module)."""
    # the model's own config, or the first submodule's (a backbone inside a wrapper such as HeadedModel)
    configs = (getattr(m, "config", None) for m in model.modules())
    model_type = next((c.model_type for c in configs if getattr(c, "model_type", None)), None)
    if model_type in LORA_TARGETS:
        targets = LORA_TARGETS[model_type]
        if model_type in ("bert", "roberta"):  # the pooler's dense is a head, not the encoder
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            found = sorted({n for n in names if n.split(".")[-1] in targets and "pooler" not in n})
            if not found:
                raise ConfigError(
                    f"no {'/'.join(targets)} nn.Linear layers in {type(model).__name__} (already adapted?)"
                )
            return found
        # the names of the model's own transformers version (ViT renamed its layers in transformers 5)
        present = {n for n, _ in model.named_modules()}
        return [t for t in targets if any(n == t or n.endswith("." + t) for n in present)] or list(targets)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(h in n.split(".") for h in HEAD_NAMES)
    ]
    if not names:
        raise ConfigError(f"no nn.Linear layers to adapt in {type(model).__name__}; pass target_modules=")
    return names


def lora_config(model: nn.Module, r: int = 8, alpha: float = 8.0, **kwargs: Any) -> Any:
    """A PEFT ``LoraConfig`` on the default targets for ``model`` (kwargs override, e.g. target_modules)."""
    from peft import LoraConfig

    kwargs.setdefault("target_modules", default_lora_targets(model))
    if kwargs.pop("use_dora", False):
        raise ConfigError("DoRA is not supported: it is not a linear rescaling of ΔW")
    return LoraConfig(r=r, lora_alpha=alpha, **kwargs)
