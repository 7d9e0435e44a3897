"""Suites: a backbone W0 and the tasks that share it, each with data splits, a frozen head and a loss.

Only the backbone update is trained and merged; heads stay frozen (like CLIP's zero-shot text heads).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trap2.errors import ConfigError, UnknownNameError
from trap2.objectives.base import Loss


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, ...) inputs, already transformed for the task
    y: torch.Tensor  # (N,) int64 labels

    def __len__(self) -> int:
        return int(self.y.shape[0])


# the splits that training reads: batches from train, the validation accuracy it records (and with
# select='best' the step it releases) from val; test is for evaluation only
TRAINING_SPLITS = ("train", "val")
# the splits an evaluation reads: attacks train on train, searches score val, reports score test
EVAL_SPLITS = ("train", "val", "test")


def splits_digest(splits: Mapping[str, Split]) -> str:
    """blake2b (16 bytes, hex) of split data: for each split in name order, its name, then ``x`` and ``y``
    each as dtype, shape and raw bytes. The same data gives the same digest in any process, on any device
    and in any order of ``splits``."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(splits):
        split = splits[name]
        h.update(f"{name};".encode())
        for t in (split.x, split.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # (numel · itemsize,) bytes, no copy
    return h.hexdigest()


class CosineHead(nn.Module):
    """Frozen cosine classifier: logits = scale · cos(feature, prototype_c)."""

    def __init__(self, prototypes: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))  # (C, d)
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, C)
        return self.logit_scale * F.normalize(features, dim=-1) @ self.prototypes.T


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy over the targets that are not ``ignore_index``.

    logits (N, C) with targets (N,), or token logits (N, C, L) with targets (N, L) (``F.cross_entropy``'s
    layout). ``loss(logits, y)`` is the mean over every counted target of the batch; ``per_sample`` is
    (N,): sample i's mean over its own counted targets, Σ_t m_it·CE_it / Σ_t m_it (0 if it has none).
    """

    ignore_index: int = -100

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, ignore_index=self.ignore_index)

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        each = F.cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="none")  # (N, ...)
        if each.dim() == 1:
            return each
        counted = (y != self.ignore_index).flatten(1).to(each.dtype)  # (N, L); ignored targets give 0
        return each.flatten(1).sum(1) / counted.sum(1).clamp_min(1.0)


class TaskModel(nn.Module):
    """Backbone (trainable or adapted) followed by a task's frozen head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# A task's own metric, for tasks not scored by head(backbone(x)).argmax() == y (e.g. exact match of
# generated answers): (backbone, split, parameter overrides or None) -> score in [0, 1].
Evaluator = Callable[[nn.Module, Split, Mapping[str, torch.Tensor] | None], float]


@dataclass
class Task:
    name: str
    n_classes: int
    train: Split
    val: Split
    test: Split
    head: nn.Module  # frozen: a CosineHead, or any parameter-free module
    description: str = ""
    evaluate: Evaluator | None = None
    # loss(logits, y) the batch mean, loss.per_sample(logits, y) one value per sample: what objectives take
    loss: Loss = field(default_factory=CrossEntropy)
    # {split names: (the splits hashed, their digest)} of data_digest / eval_digest; a replaced split is
    # hashed again
    _digests: dict[tuple[str, ...], tuple[tuple[Split, ...], str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _splits_digest(self, names: tuple[str, ...]) -> str:
        """:func:`splits_digest` of the splits ``names``, computed once per split objects (a Split is
        frozen; a tensor edited in place after the first call is not seen: build a new Split)."""
        splits = tuple(self.split(s) for s in names)
        known = self._digests.get(names)
        if known is None or any(a is not b for a, b in zip(known[0], splits, strict=True)):
            known = self._digests[names] = (splits, splits_digest(dict(zip(names, splits, strict=True))))
        return known[1]

    def data_digest(self) -> str:
        """:func:`splits_digest` of the splits training reads (:data:`TRAINING_SPLITS`): part of the cache
        key of an update trained on this task."""
        return self._splits_digest(TRAINING_SPLITS)

    def eval_digest(self) -> str:
        """:func:`splits_digest` of every split (:data:`EVAL_SPLITS`): part of the key of every finished
        evaluation record (:mod:`trap2.eval.cells`), whose accuracies depend on val and test and whose
        attacks train on train."""
        return self._splits_digest(EVAL_SPLITS)

    def head_on(self, device: torch.device | str) -> nn.Module:
        """The head on ``device``: the task's own where it already is, else a copy, so a run on a GPU
        leaves the suite's shared heads where they are."""
        device = torch.device(device)
        tensors = [*self.head.parameters(), *self.head.buffers()]
        if all(t.device == device for t in tensors):
            return self.head
        return copy.deepcopy(self.head).to(device)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise UnknownNameError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)


@dataclass
class Suite:
    name: str
    tasks: dict[str, Task]
    make_backbone: Callable[[], nn.Module]  # a fresh backbone holding W0
    lora_targets: tuple[str, ...]
    default_target: str
    fingerprint: str  # sha256 of the backbone weights: recorded in every update made on this suite
    info: dict[str, object] = field(default_factory=dict)
    # parameter-name prefixes that full fine-tuning leaves at W0 (e.g. a large word-embedding table)
    full_frozen: tuple[str, ...] = ()
    # the suite's training recipe per mode for ``trap2 bench``: TrainConfig fields over the defaults
    recipes: dict[str, dict[str, object]] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown task {name!r} in suite {self.name!r}; valid: {', '.join(self.tasks)}"
            ) from None

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def subset(self, names: Sequence[str]) -> Suite:
        """The suite restricted to the tasks ``names`` (a smaller pool to merge); empty = unchanged. The
        default target stays the suite's own when it is kept, else the first task named."""
        if not names:
            return self
        for n in names:
            self.task(n)  # validates the name
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: a task is named twice in {list(names)}")
        if len(names) < 2:
            raise ConfigError(f"tasks: a merge needs at least two tasks, got {list(names)}")
        target = self.default_target if self.default_target in names else names[0]
        return dataclasses.replace(self, tasks={n: self.tasks[n] for n in names}, default_target=target)


def prototype_tasks(
    backbone: nn.Module,
    prepared: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
    logit_scale: float,
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> dict[str, Task]:
    """Tasks from prepared splits ({name: (tensors, meta)}), each head the class-mean prototypes of W0
    features on its own training split; ``transform`` maps the stored inputs (e.g. uint8 → normalised)."""
    tasks = {}
    for name, (tensors, meta) in prepared.items():
        splits = {s: Split(transform(tensors[f"x_{s}"]), tensors[f"y_{s}"]) for s in ("train", "val", "test")}
        n_classes = int(meta.get("n_classes", int(splits["train"].y.max()) + 1))
        head = prototype_head(backbone, splits["train"], n_classes, logit_scale)
        tasks[name] = Task(
            name, n_classes, splits["train"], splits["val"], splits["test"], head, meta.get("source", "")
        )
    return tasks


@torch.no_grad()
def prototype_head(backbone: nn.Module, split: Split, n_classes: int, logit_scale: float) -> CosineHead:
    """Class-mean prototypes of W0 features on the training split (no test labels involved)."""
    backbone.eval()
    feats = F.normalize(backbone(split.x), dim=-1)
    protos = torch.stack([feats[split.y == c].mean(0) for c in range(n_classes)])
    return CosineHead(protos, logit_scale)
