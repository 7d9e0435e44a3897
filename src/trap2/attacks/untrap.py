"""Un-trapping: the attacker fine-tunes a released update alone, as full weights W0 + ΔW, for a few
steps on k labelled training samples of its task with the ``flatten`` objective (accurate at every
scale), then merges the result instead. This is the adaptive attack Trap²'s paper leaves open: it costs
the attacker labelled data and compute, and it is measured with the same budget on unprotected updates.
"""

from __future__ import annotations

import dataclasses

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.suites.base import Split, Suite
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
