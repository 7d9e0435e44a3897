"""Evaluation plumbing for merge attacks on one suite: W0 once, the normalisers, the stacked inputs, on a
chosen device; and a cache of what searches share (the global optimum of a pool, un-trapped updates).

Cache keys name updates by content (a hash of their tensors and task), never by ``id()``: an update
that changes, or a new one at a recycled address, is a new key.

A per-task merge (EMR-Merging: :class:`~trap2.merging.TaskDeltas`) becomes :class:`TaskParams`, one
parameter set per task; each task is then evaluated on its own parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call

from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy, base_state
from trap2.merging import TaskDeltas
from trap2.suites.base import Suite
from trap2.updates import LowRank, Update, apply_delta

T = TypeVar("T")


def update_key(update: Update) -> str:
    """A fingerprint of an update's content: its task and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(update.meta.get("task")).encode())
    for name in sorted(update.deltas):
        d = update.deltas[name]
        parts = (d.A, d.B) if isinstance(d, LowRank) else (d,)
        extra = (d.scaling, d.fan_in_fan_out) if isinstance(d, LowRank) else ()
        h.update(f"{name}{extra}".encode())
        for t in parts:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TaskParams(dict):
    """{task: parameters}: a per-task merge's parameters, each task evaluated at its own."""


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (CUDA when available) as a torch device."""
    from trap2.training.loop import resolve_device as resolve

    return resolve(str(device))


@dataclass
class EvalContext:
    """Evaluation plumbing for one suite: W0 once, the normalisers (unprotected fine-tuned val accuracy
    per task), every task's inputs stacked on ``device`` for one forward per evaluation.

    ``EvalContext.normalised_by(suite, updates)`` takes the normalisers from each task's own update."""

    suite: Suite
    normalisers: Mapping[str, float]
    tasks: Sequence[str] | None = None  # default: every task of the suite
    device: str | torch.device = "cpu"  # 'auto': CUDA when available
    backbone: nn.Module | None = field(default=None, repr=False)  # default: a fresh one from the suite
    evaluations: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks or self.suite.task_names)
        missing = [t for t in self.tasks if t not in self.normalisers]
        if missing:
            raise ConfigError(
                f"EvalContext: no normaliser for task {missing[0]!r}; give one per task "
                f"(or build it with EvalContext.normalised_by(suite, updates))"
            )
        self.normalisers = dict(self.normalisers)
        self.device = resolve_device(self.device)
        backbone = self.backbone if self.backbone is not None else self.suite.make_backbone()
        self.backbone = backbone.eval().to(self.device)
        self.w0 = base_state(self.backbone)
        self._cache: dict[Hashable, Any] = {}
        custom = any(self.suite.task(t).evaluate is not None for t in self.tasks)
        self._heads = {} if custom else {t: self.suite.task(t).head_on(self.device) for t in self.tasks}
        self._stacked = {} if custom else {split: self._stack(split) for split in ("val", "test")}

    @classmethod
    def normalised_by(
        cls,
        suite: Suite,
        updates: Mapping[str, Update],
        tasks: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> EvalContext:
        """A context whose normaliser for each task is its validation accuracy at W0 + ``updates[task]``."""
        backbone = suite.make_backbone().eval().to(resolve_device(device))
        w0 = base_state(backbone)
        normalisers = {
            t: accuracy(backbone, suite.task(t), "val", apply_delta(w0, u.dense()))
            for t, u in updates.items()
        }
        return cls(suite, normalisers, tasks, device, backbone)

    def _stack(self, split: str) -> tuple[torch.Tensor, list[tuple[str, int, int, torch.Tensor]]]:
        """Every task's inputs in one batch (one forward per evaluation), with each task's slice and labels."""
        xs, spans, start = [], [], 0
        for t in self.tasks:
            data = self.suite.task(t).split(split)
            xs.append(data.x)
            spans.append((t, start, start + len(data), data.y.to(self.device)))
            start += len(data)
        return torch.cat(xs).to(self.device), spans

    def cached(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per key (keys built from :func:`update_key`, never from ``id()``)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @torch.no_grad()
    def accuracies(self, params: Mapping[str, torch.Tensor] | TaskParams, split: str) -> dict[str, float]:
        if isinstance(params, TaskParams):
            return self._task_accuracies(params, split)
        if not self._stacked:  # tasks with their own metric (e.g. exact match of generated answers)
            return {t: accuracy(self.backbone, self.suite.task(t), split, params) for t in self.tasks}
        x, spans = self._stacked[split]
        feats = functional_call(self.backbone, dict(params), (x,), strict=False)
        return {t: int((self._heads[t](feats[a:b]).argmax(-1) == y).sum()) / (b - a) for t, a, b, y in spans}

    def _task_accuracies(self, params: TaskParams, split: str) -> dict[str, float]:
        """Each task at its own parameters: one forward per task on its slice of the stacked inputs."""
        missing = [t for t in self.tasks if t not in params]
        if missing:
            raise ConfigError(f"per-task merge: no merged parameters for task {missing[0]!r}")
        if not self._stacked:
            return {t: accuracy(self.backbone, self.suite.task(t), split, params[t]) for t in self.tasks}
        x, spans = self._stacked[split]
        out = {}
        for t, a, b, y in spans:
            feats = functional_call(self.backbone, dict(params[t]), (x[a:b],), strict=False)
            out[t] = int((self._heads[t](feats).argmax(-1) == y).sum()) / (b - a)
        return out

    def untrapped(self, update: Update) -> Update:
        """``update`` un-trapped on k labelled samples of its task (once per update content)."""
        from trap2.attacks.untrap import untrap

        return self.cached(
            ("untrapped", update_key(update)), lambda: untrap(self.suite, update, update.meta["task"])
        )

    def recovered_from_w0(self, k: int, names: Sequence[str]) -> dict[str, float]:
        """Test accuracies of W0 itself after the recovery fine-tuning (the reference a merge must beat
        to be worth anything to an attacker with k labelled samples per task); once per k and tensors."""
        from trap2.attacks.recover import recover

        key = tuple(sorted(names))

        def compute() -> dict[str, float]:
            zero = {n: torch.zeros_like(self.w0[n]) for n in key}
            return self.test_accs(
                self.params(recover(self.suite, self.tasks, self.w0, zero, k, backbone=self.backbone))
            )

        return self.cached(("recovered_from_w0", k, key), compute)

    def params(
        self, delta: Mapping[str, torch.Tensor] | TaskDeltas, c: float = 1.0
    ) -> dict[str, torch.Tensor] | TaskParams:
        """W0 + c·ΔW for the tensors ΔW touches, on the context's device; for a per-task merge, each
        member's task (its recorded one, else the context's task at its position) at W0 + c·ΔW_i."""
        if isinstance(delta, TaskDeltas):
            tasks = [t or self.tasks[i] for i, t in enumerate(delta.tasks)]
            return TaskParams({t: apply_delta(self.w0, d, c) for t, d in zip(tasks, delta, strict=True)})
        return apply_delta(self.w0, delta, c)

    def val_score(self, params: Mapping[str, torch.Tensor] | TaskParams) -> float:
        """Mean normalised validation accuracy over the suite's tasks."""
        self.evaluations += 1
        accs = self.accuracies(params, "val")
        return sum(accs[t] / max(self.normalisers[t], 1e-8) for t in accs) / len(accs)

    def test_accs(self, params: Mapping[str, torch.Tensor] | TaskParams) -> dict[str, float]:
        accs = self.accuracies(params, "test")
        return {**accs, "mean": sum(accs.values()) / len(accs)}
