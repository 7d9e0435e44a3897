"""Distillation un-trapping, DisTaC-style (Yoshida et al., "DisTaC: Conditioning Task Vectors via
Distillation for Robust Model Merging", arXiv 2508.01148, ICLR 2026).

DisTaC pre-conditions a task vector before a merge: it rescales τ to a target norm (the norm
adjustment: the other members' mean norm), then restores the accuracy the rescaling cost by knowledge
distillation from the original fine-tuned model on unlabelled inputs of the task. Against Trap² the
attacker does the same with the *released* model at s = 1 as the teacher (it works there): the student

    ΔW_s = argmin  E_x KL( softmax(h(f(x; W0 + ΔW)) / T) ‖ softmax(h(f(x; W0 + ΔW_s)) / T) ) · T²

is trained from the released update rescaled to the target norm (``init='release'``, DisTaC's recipe) or
from W0 (``init='w0'``), LoRA (the release's own factors, or a fresh branch) or every weight, for a few
hundred steps on the first ``samples`` unlabelled training inputs of the task (labels never read; the
teacher's logits h(f(x; W0 + ΔW)) computed once). After training the student is rescaled once more so
that ‖ΔW_s‖_F equals the target norm exactly (the norm adjustment as a final projection; DisTaC keeps
the norm while distilling), then it replaces the release in the merge.

What we chose where the paper leaves room: T = 1 (the paper sharpens a low-confidence teacher with
T < 1; a Trap² release is confident at s = 1), the KL on the task head's logits (our heads are frozen),
the Frobenius norm over every tensor of the update, and the student's settings (lr, steps, samples,
LoRA or full, optimiser) from the attacker grid's :class:`~trap2.attacks.finetune.AttackPoint`.

The **distillation ceiling**: a fresh LoRA (``init='w0'``, no norm matching) distilled from the same
teacher on the same unlabelled budget, used alone, with no merge. A protected update is protected
against distillation only where the merge built from its student is no better than that reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trap2.attacks.finetune import AttackPoint, fit_delta
from trap2.errors import ConfigError
from trap2.suites.base import Task
from trap2.updates import LowRank, Update, apply_delta

INITS = ("release", "w0")
TEMPERATURE = 1.0


def delta_norm(delta: Mapping[str, torch.Tensor | LowRank]) -> float:
    """‖ΔW‖_F over every tensor of a delta (LoRA branches as their dense product)."""
    total = 0.0
    for d in delta.values():
        t = d.dense() if isinstance(d, LowRank) else d
        total += float(t.double().pow(2).sum())
    return math.sqrt(total)


def others_norm(pool: Sequence[Update], index: int) -> float:
    """The DisTaC target norm: the mean ‖ΔW_j‖_F of the pool's members other than ``index``."""
    norms = [delta_norm(u.deltas) for j, u in enumerate(pool) if j != index]
    if not norms:
        raise ConfigError("distill: the norm adjustment needs at least one other member in the pool")
    return sum(norms) / len(norms)


def rescaled(delta: Mapping[str, torch.Tensor | LowRank], factor: float) -> dict[str, torch.Tensor | LowRank]:
    """``factor``·ΔW, a LoRA branch through its B factor (it stays low-rank)."""
    return {
        n: LowRank(d.A, d.B * factor, d.scaling, d.fan_in_fan_out) if isinstance(d, LowRank) else d * factor
        for n, d in delta.items()
    }


@torch.no_grad()
def _logits(
    backbone: nn.Module, head: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 256):  # (n, classes), in chunks: a Transformer over 1000 texts at once is large
        out.append(head(functional_call(backbone, dict(params), (x[i : i + 256],), strict=False)).float())
    return torch.cat(out)


def distill_update(
    backbone: nn.Module,
    w0: Mapping[str, torch.Tensor],
    release: Update,
    task: Task,
    point: AttackPoint,
    init: str = "release",
    norm: float | None = None,
    temperature: float = TEMPERATURE,
) -> Update:
    """The student distilled from W0 + ``release`` on ``point.samples`` unlabelled inputs of ``task``.

    ``init``: 'release' (the release rescaled to ``norm`` first, DisTaC) or 'w0' (a fresh student);
    ``norm``: the target ‖ΔW_s‖_F, matched exactly at the end (None: no norm adjustment, the ceiling).
    The backbone is used as it is (put it in eval mode for a deterministic teacher)."""
    if init not in INITS:
        raise ConfigError(f"distill: init={init!r} is not one of {', '.join(INITS)}")
    if norm is not None and not (norm > 0 and math.isfinite(norm)):
        raise ConfigError(f"distill: the target norm must be finite and > 0, got {norm}")
    if not temperature > 0:
        raise ConfigError(f"distill: the temperature must be > 0, got {temperature}")
    device = next(iter(w0.values())).device
    names = [n for n in release.deltas if n in w0]
    if len(names) != len(release.deltas):
        missing = next(n for n in release.deltas if n not in w0)
        raise ConfigError(f"distill: {missing!r} of the release is not a parameter of the backbone")
    head = task.head_on(device)
    x = task.train.x[: point.samples].to(device)  # unlabelled: task.train.y is never read
    teacher = _logits(backbone, head, apply_delta(w0, release.dense()), x)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    start: dict[str, torch.Tensor | LowRank] = {}
    if init == "release":
        own = delta_norm(release.deltas)
        factor = norm / own if norm is not None and own > 0 else 1.0
        start = rescaled(release.deltas, factor)
    gen = torch.Generator().manual_seed(point.seed)

    def loss(params_at, _step: int) -> torch.Tensor:
        idx = torch.randperm(len(x), generator=gen)[: point.batch].to(device)
        feats = functional_call(backbone, params_at(1.0), (x[idx],), strict=False)
        log_q = F.log_softmax(head(feats).float() / temperature, dim=-1)
        return F.kl_div(log_q, log_p[idx], log_target=True, reduction="batchmean") * temperature**2

    student = fit_delta(w0, {}, names, point, loss, init=start)
    if norm is not None:
        own = delta_norm(student)
        if own > 0:
            student = rescaled(student, norm / own)
    meta = {
        **release.meta,
        "distilled": {**point.record(), "init": init, "norm": norm, "temperature": temperature},
    }
    return Update({n: d for n, d in student.items()}, meta)
