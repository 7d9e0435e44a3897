"""Train a suite task through ``Trap2Trainer`` with the built-in loop's :class:`TrainConfig`.

The same optimiser (AdamW, betas, eps, weight decay), warm-up + cosine schedule, clipping, batch,
steps, LoRA settings and objective as :func:`trap2.training.loop.train_update`, so the two paths can be
compared number for number (``scripts/trainer_parity.py``). Two differences remain, both small: the
Trainer's sampler orders the data differently, and its warm-up starts at lr 0 instead of lr/warmup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trap2.config import TrainConfig, to_dict
from trap2.errors import ConfigError
from trap2.hf.models import task_examples, task_model
from trap2.hf.trainer import Trap2Trainer, Trap2TrainingArguments
from trap2.suites.base import Suite
from trap2.training.loop import trainable_backbone
from trap2.updates import Update, load_update


def training_arguments(cfg: TrainConfig, output_dir: str | Path, **overrides: Any) -> Trap2TrainingArguments:
    """``Trap2TrainingArguments`` equivalent to ``cfg`` (``overrides`` win, e.g. logging_steps); an objective
    the Trainer does not offer is refused by the arguments themselves."""
    if cfg.select != "last":
        raise ConfigError("the Trainer path releases the last step (select='last')")
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=cfg.run_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_epsilon=cfg.eps,
        max_grad_norm=cfg.grad_clip or 0.0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=cfg.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, cfg.eval_every),
        disable_tqdm=True,
        dataloader_drop_last=True,
        remove_unused_columns=False,  # HeadedModel takes **inputs: keep every column
        trap2_max_nonfinite_in_row=cfg.max_nonfinite_in_row,
    )
    kwargs.update(Trap2TrainingArguments.objective_arguments(cfg.objective))
    kwargs.update(overrides)
    return Trap2TrainingArguments(**kwargs)


def train_with_trainer(
    suite: Suite, task_name: str, cfg: TrainConfig, output_dir: str | Path, **overrides: Any
) -> tuple[Update, Trap2Trainer]:
    """Fine-tune ``task_name`` with ``cfg`` through ``Trap2Trainer``; return the update and the trainer."""
    task = suite.task(task_name)
    torch.manual_seed(cfg.seed)  # the LoRA initialisation, as in the built-in loop
    backbone = trainable_backbone(suite, cfg)
    model = task_model(backbone, task)
    args = training_arguments(cfg, output_dir, **overrides)
    trainer = Trap2Trainer(model=model, args=args, train_dataset=task_examples(task, "train"))
    trainer.train()
    meta = {
        "suite": suite.name,
        "task": task_name,
        "base_fingerprint": suite.fingerprint,
        "train": {k: v for k, v in to_dict(cfg).items() if k not in ("objective", "device")},
    }
    path = Path(output_dir) / "update"
    trainer.save_update(path, module=model.backbone, meta=meta)
    return load_update(path), trainer
