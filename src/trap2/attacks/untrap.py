"""Un-trapping: the attacker fine-tunes a released update alone, as full weights W0 + ΔW, for a few
steps on k labelled training samples of its task with the ``flatten`` objective (accurate at every
scale), then merges the result instead. This is the adaptive attack Trap²'s paper leaves open: it costs
the attacker labelled data and compute, and it is measured with the same budget on unprotected updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch.func import functional_call

from trap2.attacks.finetune import AttackPoint, fit_delta
from trap2.config import ObjectiveConfig, TrainConfig
from trap2.suites.base import Split, Suite, Task
from trap2.updates import Update

K = 100
STEPS = 100
LAM = 1.0


def untrap(
    suite: Suite, update: Update, task: str, k: int = K, steps: int = STEPS, lam: float = LAM, seed: int = 0
) -> Update:
    """``update`` after ``steps`` full fine-tuning steps on the first ``k`` training samples of ``task``."""
    from trap2.training.loop import train_update

    t = suite.task(task)
    few = dataclasses.replace(t, train=Split(t.train.x[:k], t.train.y[:k]))
    small = dataclasses.replace(suite, tasks={**suite.tasks, task: few})
    recipe = suite.recipes.get("full", {})
    cfg = TrainConfig(
        mode="full",
        steps=steps,
        batch_size=min(32, k),
        lr=float(recipe.get("lr", 1e-3)),  # the suite's full fine-tuning lr: stable on its backbone
        warmup_steps=min(10, steps),
        eval_every=steps,
        select="last",
        seed=seed,
        objective=ObjectiveConfig(name="flatten", lam=lam),
    )
    result = train_update(small, task, cfg, init=update.dense())
    result.update.meta.update(
        {"untrapped_from": update.meta.get("objective"), "untrap": {"k": k, "steps": steps}}
    )
    return result.update


def untrap_at(
    backbone: torch.nn.Module,
    w0: Mapping[str, torch.Tensor],
    update: Update,
    task: Task,
    point: AttackPoint,
    from_w0: bool = False,
    lam: float = LAM,
) -> Update:
    """Un-trapping at one attacker-grid point: the ``flatten`` objective J = L(1) + λ·w(s)·L(s) (one s
    a step, the objective's default law and weight) on ``point.samples`` labelled samples of ``task``,
    starting from ``update`` (its LoRA factors under LoRA, its dense ΔW under full) or, with ``from_w0``,
    from W0 (the same budget spent on a fresh update: the reference without the release)."""
    from trap2.objectives.trap2 import sample_scales, scale_weight

    device = next(iter(w0.values())).device
    cfg = ObjectiveConfig(name="flatten", lam=lam)
    gen = torch.Generator().manual_seed(point.seed)
    head, loss_fn = task.head_on(device), task.loss
    x, y = task.train.x[: point.samples].to(device), task.train.y[: point.samples].to(device)

    def loss(params_at, _step: int) -> torch.Tensor:
        idx = torch.randperm(len(y), generator=gen)[: point.batch].to(device)
        (s,) = sample_scales(cfg, 1, gen)
        nominal = loss_fn(head(functional_call(backbone, params_at(1.0), (x[idx],), strict=False)), y[idx])
        off = loss_fn(head(functional_call(backbone, params_at(s), (x[idx],), strict=False)), y[idx])
        return nominal + lam * scale_weight(cfg.weight, s) * off

    names = [n for n in update.deltas if n in w0]
    trained = fit_delta(w0, {}, names, point, loss, init=None if from_w0 else update.deltas)
    meta = {**update.meta, "untrap": {**point.record(), "from_w0": from_w0}}
    return Update(dict(trained), meta)
