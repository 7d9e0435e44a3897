"""Hugging Face integration: ``Trap2Trainer`` / ``Trap2Mixin`` / ``Trap2TrainingArguments``,
``Trap2ProtectTrainer`` (protect an update you already have) and default LoRA targets per architecture. Importing it imports ``transformers``."""

from trap2.hf.protect import Trap2ProtectMixin, Trap2ProtectTrainer
from trap2.hf.targets import LORA_TARGETS, default_lora_targets, lora_config
from trap2.hf.trainer import Trap2Mixin, Trap2Trainer, Trap2TrainingArguments

__all__ = [
    "LORA_TARGETS",
    "Trap2Mixin",
    "Trap2ProtectMixin",
    "Trap2ProtectTrainer",
    "Trap2Trainer",
    "Trap2TrainingArguments",
    "default_lora_targets",
    "lora_config",
]
