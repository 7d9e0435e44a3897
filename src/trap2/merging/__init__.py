"""Merging: registered methods (one module each), merge spaces, and the model-level merge.

``merge_updates(updates, "ties", space="knots", k=20)`` merges whole updates tensor by tensor and
returns an :class:`~trap2.updates.Update` (low-rank where the space gives low-rank results);
``merge_deltas`` is the dense shortcut. A per-task method (EMR-Merging) gives a :class:`PerTaskMerge`:
one update per member, each evaluated on its member's task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trap2.errors import ConfigError
from trap2.merging import (  # noqa: F401  (registers the methods)
    cart,
    dare,
    emr,
    iso,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from trap2.merging.dare import content_seed
from trap2.merging.registry import METHODS, HParam, MergeMethod, merge_method
from trap2.merging.spaces import SPACES
from trap2.merging.ties import magnitude_threshold
from trap2.updates import Delta, LowRank, Update

INTERNAL_HPARAMS = ("thresholds", "seeds", "rescalers")  # filled in by merge_updates, not set by users


def get_merge_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run seed and the tensor's name (order-independent, reproducible)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def scale_delta(d: Delta, c: float) -> Delta:
    """c·ΔW, keeping a LoRA branch low-rank (its scaling absorbs c)."""
    if c == 1.0:
        return d
    return LowRank(d.A, d.B, d.scaling * c, d.fan_in_fan_out) if isinstance(d, LowRank) else d * c


class TaskDeltas(list):
    """A per-task merge as dense deltas: one {name: ΔW} per member, in member order; ``tasks[i]`` is
    member i's task (None: the evaluation's i-th task). Each task is evaluated at W0 + its own delta."""

    def __init__(self, deltas: Sequence[dict[str, torch.Tensor]], tasks: Sequence[str | None]) -> None:
        super().__init__(deltas)
        self.tasks = list(tasks)


@dataclass(frozen=True)
class PerTaskMerge:
    """What a per-task method (EMR-Merging) returns: one merged update per member (its own mask and
    rescaler applied to the shared unified update), in member order."""

    updates: tuple[Update, ...]
    tasks: tuple[str | None, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def dense(self) -> TaskDeltas:
        return TaskDeltas([u.dense() for u in self.updates], self.tasks)


def merge_updates(
    updates: Sequence[Update | Mapping[str, torch.Tensor]],
    method: str | MergeMethod,
    space: str = "full",
    weights: Sequence[float] | None = None,
    **hparams: Any,
) -> Update | PerTaskMerge:
    """Merge updates tensor by tensor: {name: space(method, [ΔW_1[name], …])}.

    ``weights`` scale each member before merging (per-task coefficients; a global coefficient is
    applied to the result instead). A name missing from some updates is merged over those that have it.
    A per-task method returns a :class:`PerTaskMerge` (a member lacking a name gets no delta for it).
    """
    m = get_merge_method(method) if isinstance(method, str) else method
    space_fn = SPACES.get(space)
    ups = [u if isinstance(u, Update) else Update(dict(u)) for u in updates]
    if not ups:
        raise ConfigError("merge needs at least one update")
    if weights is not None and len(weights) != len(ups):
        raise ConfigError(f"got {len(weights)} weights for {len(ups)} updates")
    resolved = m.resolve(**hparams)
    thresholds = None
    model_hp: dict[str, list[Any]] = {}  # a method's own model-wide statistics, one value per member
    if resolved.get("scope") == "model":
        if space != "full":
            raise ConfigError(
                f"{m.name}: scope='model' is defined in full space only ({space} merges per-tensor factors "
                "in other units); use scope='tensor'"
            )
        if m.model_scope is not None:
            model_hp = m.model_scope([_weighted(u, weights, i) for i, u in enumerate(ups)])
        else:
            thresholds = model_thresholds(ups, weights, resolved["k"])
    names = list(dict.fromkeys(n for u in ups for n in u.deltas))
    out: dict[str, Delta] = {}
    per_member: list[dict[str, Delta]] = [{} for _ in ups]  # per-task methods
    for name in names:
        idx = [i for i, u in enumerate(ups) if name in u.deltas]
        members = [scale_delta(ups[i].deltas[name], 1.0 if weights is None else weights[i]) for i in idx]
        shapes = {tuple(_shape(d)) for d in members}
        if len(shapes) != 1:
            raise ConfigError(f"tensor {name!r} has different shapes across updates: {sorted(shapes)}")
        hp = dict(resolved)
        if "seeds" in hp:  # random methods: one seed per member, from its raw input (order-independent)
            base = tensor_seed(resolved["seed"], name)
            hp["seeds"] = [content_seed(base, *_raw(ups[i].deltas[name])) for i in idx]
        if thresholds is not None:
            hp["thresholds"] = [thresholds[i] for i in idx]
        for k, values in model_hp.items():
            hp[k] = [values[i] for i in idx]
        result = space_fn(m, members, hp)
        if m.per_task:
            for i, d in zip(idx, result, strict=True):
                per_member[i][name] = d
        else:
            out[name] = result
    public = {k: v for k, v in resolved.items() if k not in INTERNAL_HPARAMS}
    meta = {"merge": {"method": m.name, "space": space, "hparams": public}}
    if m.per_task:
        tasks = tuple(u.meta.get("task") for u in ups)
        return PerTaskMerge(tuple(Update(d, dict(meta)) for d in per_member), tasks, meta)
    return Update(out, meta)


def model_thresholds(ups: Sequence[Update], weights: Sequence[float] | None, k: float) -> list[float]:
    """Per member i: the top-k % magnitude over all of w_i·ΔW_i's tensors together (TIES' model-wide trim),
    on the very values the kernel trims (weighted first, then in float32)."""
    out = []
    for i, u in enumerate(ups):
        w = 1.0 if weights is None else weights[i]
        weighted = Update({n: scale_delta(d, w) for n, d in u.deltas.items()}).dense()
        out.append(magnitude_threshold(torch.cat([t.flatten() for t in weighted.values()]), k))
    return out


def _weighted(u: Update, weights: Sequence[float] | None, i: int) -> dict[str, torch.Tensor]:
    w = 1.0 if weights is None else weights[i]
    return Update({n: scale_delta(d, w) for n, d in u.deltas.items()}).dense()


def _raw(d: Delta) -> tuple[torch.Tensor, ...]:
    return (d.A, d.B) if isinstance(d, LowRank) else (d,)


def _shape(d: Delta) -> tuple[int, ...]:
    if isinstance(d, LowRank):
        return (d.B.shape[0], *d.A.shape[1:]) if not d.fan_in_fan_out else (d.A.shape[1], d.B.shape[0])
    return tuple(d.shape)


def merge_deltas(
    method: str | MergeMethod,
    deltas: Sequence[Mapping[str, torch.Tensor]],
    space: str = "full",
    **hparams: Any,
) -> dict[str, torch.Tensor] | TaskDeltas:
    """Dense shortcut: merge dense updates and return dense deltas (one dict per member for a per-task
    method)."""
    return merge_updates(list(deltas), method, space, **hparams).dense()


__all__ = [
    "METHODS",
    "SPACES",
    "HParam",
    "MergeMethod",
    "PerTaskMerge",
    "TaskDeltas",
    "get_merge_method",
    "merge_deltas",
    "merge_method",
    "merge_updates",
    "scale_delta",
    "tensor_seed",
]
