"""Recovery: supervised fine-tuning of a merged model on k labelled training samples per task.

The attacker takes the best merge its coefficient search found and fine-tunes every tensor the merge
changed (full weights, heads frozen) on the first ``k`` training samples of each task, all tasks in every
step, plain cross-entropy. The same budget goes to the merge of the unprotected pool, so the report can
say how much of the gap to the unprotected merge the data buys back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call

from trap2.attacks.finetune import AttackPoint, fit_delta
from trap2.suites.base import Suite, Task
from trap2.updates import LowRank

KS = (10, 100)
STEPS = 100
BATCH = 16  # samples per task in each step


def recover(
    suite: Suite,
    tasks: list[str],
    w0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    k: int,
    steps: int = STEPS,
    lr: float | None = None,
    seed: int = 0,
    backbone: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The merged ``delta`` after ``steps`` AdamW steps on k samples of each task; returns the new delta
    (trained weights − W0) over the same tensors. ``lr``: default the suite's full fine-tuning lr."""
    if k < 1 or steps < 0:
        raise ValueError(f"recover: k={k} must be ≥ 1 and steps={steps} ≥ 0")
    device = next(iter(w0.values())).device  # everything runs where W0 lives
    backbone = backbone if backbone is not None else suite.make_backbone().eval().to(device)
    lr = float(lr if lr is not None else suite.recipes.get("full", {}).get("lr", 1e-3))
    gen = torch.Generator().manual_seed(seed)
    data = [
        (
            suite.task(t).head_on(device),
            suite.task(t).loss,
            suite.task(t).train.x[:k].to(device),
            suite.task(t).train.y[:k],
        )
        for t in tasks
    ]
    weights = {n: (w0[n] + d.to(w0[n])).clone().requires_grad_(True) for n, d in delta.items()}
    opt = torch.optim.AdamW(list(weights.values()), lr=lr, weight_decay=0.0)
    batch = min(k, BATCH)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for head, loss_fn, x, y in data:
            idx = torch.randperm(len(y), generator=gen)[:batch]
            feats = functional_call(backbone, weights, (x[idx.to(device)],), strict=False)
            loss = loss + loss_fn(head(feats), y[idx].to(device))
        (loss / len(data)).backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        opt.step()
    return {n: (w.detach() - w0[n]) for n, w in weights.items()}


def recover_at(
    backbone: torch.nn.Module,
    tasks: list[Task],
    w0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    point: AttackPoint,
) -> dict[str, torch.Tensor | LowRank]:
    """Recovery at one attacker-grid point (:class:`~trap2.attacks.finetune.AttackPoint`): ``delta``
    (the merge, or zeros for the same recovery from W0) fine-tuned on ``point.samples`` labelled samples
    per task, every weight or a LoRA branch on top, AdamW or SGD; cross-entropy over all tasks each step.
    Returns the recovered delta over ``delta``'s tensors."""
    device = next(iter(w0.values())).device
    gen = torch.Generator().manual_seed(point.seed)
    data = [
        (t.head_on(device), t.loss, t.train.x[: point.samples].to(device), t.train.y[: point.samples])
        for t in tasks
    ]

    def loss(params_at, _step: int) -> torch.Tensor:
        params, total = params_at(1.0), torch.zeros((), device=device)
        for head, loss_fn, x, y in data:
            idx = torch.randperm(len(y), generator=gen)[: point.batch]
            feats = functional_call(backbone, params, (x[idx.to(device)],), strict=False)
            total = total + loss_fn(head(feats), y[idx].to(device))
        return total / len(data)

    base = {n: d.to(w0[n]) for n, d in delta.items()}
    return fit_delta(w0, base, list(delta), point, loss)
