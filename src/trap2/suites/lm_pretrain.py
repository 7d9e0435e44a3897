"""Pretraining of the ``lm`` suite's backbone: next-token prediction on :class:`~trap2.suites.lm_text.Mixture`,
resumable in chunks (a time or step budget per call) with the same result as one uninterrupted run.

The data of step k depend only on (seed, k) and the model's initialisation only on the seed; a checkpoint
holds the model, the optimiser and the step. A fixed validation set gives the loss recorded with the
shipped weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trap2.config import help_field
from trap2.errors import ConfigError
from trap2.io import atomic_path
from trap2.suites.lm_text import Mixture, model_config


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = help_field("total optimizer steps", 4000)
    batch_size: int = help_field("sequences per step", 32)
    lr: float = help_field("peak learning rate (AdamW)", 3e-3)
    warmup_steps: int = help_field("linear warm-up steps before the cosine decay", 200)
    min_lr_ratio: float = help_field("the cosine decays to lr · this", 0.1)
    weight_decay: float = help_field("AdamW weight decay", 0.1)
    english_share: float = help_field("fraction of sequences that are English windows", 0.35)
    qa_share: float = help_field("fraction of sequences that are question/answer examples", 0.25)
    n_val: int = help_field("validation sequences", 256)
    seed: int = help_field("model initialisation and data", 0)
    shape: dict = help_field(
        "LlamaConfig fields over lm_text.MODEL_SHAPE (tests: a tiny model)", default_factory=dict
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_val"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain {name} must be >= 1, got {getattr(self, name)}")
        if not (self.english_share >= 0 and self.qa_share >= 0 and self.english_share + self.qa_share <= 1):
            raise ConfigError(
                f"pretrain english_share and qa_share must be >= 0 and sum to <= 1, got {self.english_share} "
                f"and {self.qa_share}"
            )
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ConfigError("pretrain lr must be > 0 and warmup_steps >= 0")


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then a cosine down to ``lr · min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def new_model(tok, seed: int, shape: dict | None = None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config(tok, shape))


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of ``ids`` (B, L)."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, L-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, batch_size: int = 64) -> float:
    was = model.training
    model.eval()
    total = sum(float(lm_loss(model, val[i : i + batch_size])) * len(val[i : i + batch_size])
                for i in range(0, len(val), batch_size))  # fmt: skip
    model.train(was)
    return total / len(val)


@dataclass
class PretrainState:
    model: Any
    optimizer: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0  # training time over every chunk so far


def start(cfg: PretrainConfig, tok) -> PretrainState:
    model = new_model(tok, cfg.seed, cfg.shape)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return PretrainState(model, opt)


def save_checkpoint(state: PretrainState, cfg: PretrainConfig, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "config": asdict(cfg),
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "step": state.step,
                "seconds": state.seconds,
            },
            tmp,
        )


def resume(cfg: PretrainConfig, tok, path: Path) -> PretrainState:
    """The state saved at ``path``; it must have been made with ``cfg``."""
    saved = torch.load(path, weights_only=True)
    if saved["config"] != asdict(cfg):
        raise ConfigError(f"{path}: the checkpoint was made with other settings ({saved['config']})")
    state = start(cfg, tok)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step, state.seconds = int(saved["step"]), float(saved["seconds"])
    return state


def train(
    state: PretrainState,
    cfg: PretrainConfig,
    mixture: Mixture,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    log_every: int = 100,
    log=None,
) -> PretrainState:
    """Train until ``cfg.steps`` in all, ``max_steps`` more, or ``max_seconds`` of this call, whichever
    comes first (a step is never cut)."""
    stop = cfg.steps if max_steps is None else min(cfg.steps, state.step + max_steps)
    t0 = time.perf_counter()
    model = state.model.train()
    while state.step < stop:
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            break
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(cfg, state.step)
        loss = lm_loss(model, mixture.batch(state.step, cfg.batch_size))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        state.optimizer.step()
        state.step += 1
        if log is not None and state.step % log_every == 0:
            log(f"step {state.step}/{cfg.steps} loss {loss.item():.4f}")
    state.seconds += time.perf_counter() - t0
    return state
