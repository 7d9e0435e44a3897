"""``trap2 merge``: merge update files for one base and write the result.

Inputs are read lazily (tensor by tensor from safetensors); the result is a PEFT adapter when PEFT can
hold all of it (LoRA inputs merged in KnOTS/Core, or by TA) and a dense delta otherwise (see
``Update.kind``: every merge result has a form that loads back exactly); ``merged_checkpoint`` also writes
W0 + c·ΔW as a full safetensors state dict. Everything that could stop the result from being written
(the destination, the search's suite, the inputs' tasks) is checked before the merge work starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trap2.attacks.merge_attack import EvalContext
from trap2.attacks.search import search_coefficient
from trap2.errors import ConfigError, UpdateFileError
from trap2.eval.evaluate import base_state
from trap2.io import atomic_dir, load_tensors, save_tensors
from trap2.merging import merge_updates, scale_delta
from trap2.suites import SUITES, get_suite, is_suite_name
from trap2.updates import Update, apply_delta, load_update


@dataclass
class MergeResult:
    update: Update
    coefficient: float
    search: dict[str, Any] | None
    out: Path


def load_base(base: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """(W0 state, fingerprint, suite name) from a suite name or a checkpoint (.safetensors or its folder)."""
    if isinstance(base, str) and is_suite_name(base) and not Path(base).exists():
        suite = get_suite(base)
        return dict(base_state(suite.make_backbone())), suite.fingerprint, suite.name
    p = Path(base)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise ConfigError(
            f"base {base!r} is neither a suite ({', '.join(SUITES.names())}) nor a checkpoint file"
        )
    tensors, _ = load_tensors(p)
    return tensors, None, None


def parse_hparams(items: Sequence[str]) -> dict[str, Any]:
    """['k=20', 'scope=model'] -> {'k': 20.0, 'scope': 'model'} (numbers become numbers)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"hyperparameter {item!r} is not KEY=VALUE")
        value: Any = raw
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        out[key] = float(value) if key in ("k", "p", "rho", "beta", "fraction") else value
    return out


def scale_update(update: Update, c: float) -> Update:
    return Update({k: scale_delta(d, c) for k, d in update.deltas.items()}, {**update.meta, "coefficient": c})


def check_destination(
    out: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse, before any merge work, an ``out`` that cannot take the result folder: an existing file,
    an input or base (or a folder holding one, which the result would replace), or an unwritable place."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    sources = [Path(p) for p in inputs] + ([Path(base)] if base is not None and Path(base).exists() else [])
    for src in sources:
        src = src.resolve()
        if src == target or target in src.parents:
            raise ConfigError(f"--out {out}: would replace the input {src}; write the result elsewhere")
    parent = next(p for p in target.parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable")


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    method: str,
    space: str,
    out: str | os.PathLike[str],
    coefficient: float | None = None,
    search_suite: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    merged_checkpoint: bool = False,
    device: str = "cpu",
) -> MergeResult:
    """Merge the updates at ``paths`` on ``base`` and write the result to ``out``; with ``search_suite``
    the coefficient is searched on that suite's validation data, evaluated on ``device``."""
    if coefficient is not None and search_suite is not None:
        raise ConfigError("give either a coefficient or a suite to search it on, not both")
    if not paths:
        raise ConfigError("merge needs at least one update")
    check_destination(out, paths, base)
    w0, fingerprint, base_suite = load_base(base)
    if search_suite is not None and base_suite != search_suite:
        raise ConfigError(f"--search {search_suite} needs --base {search_suite} (the suite's own backbone)")
    updates = [load_update(p, lazy=True) for p in paths]
    for p, u in zip(paths, updates, strict=True):
        u.check_base(w0, fingerprint, where=str(p))
    tasks = [u.meta.get("task") for u in updates]
    if search_suite is not None and None in tasks:
        bad = paths[tasks.index(None)]
        raise UpdateFileError(f"{bad}: records no task, so its accuracy cannot be measured for the search")
    merged = merge_updates(updates, method, space, **dict(hparams or {}))
    if not isinstance(merged, Update):
        raise ConfigError(f"{method} gives one merged model per task; trap2 merge writes one update")
    search = None
    if search_suite is not None:
        suite = get_suite(search_suite)
        own = dict(zip(tasks, updates, strict=True))  # each task's normaliser: its own update's val acc
        ctx = EvalContext.normalised_by(suite, own, tasks=list(own), device=device)
        dense = merged.dense()
        found = search_coefficient(lambda c: ctx.val_score(ctx.params(dense, c)))
        coefficient = found.coefficient
        search = {
            "suite": search_suite,
            "val_score": found.score,
            "points": len(found.tried),
            "test_acc": ctx.test_accs(ctx.params(dense, coefficient)),
        }
    c = 1.0 if coefficient is None else float(coefficient)
    result = scale_update(merged, c)
    result.meta["inputs"] = [str(p) for p in paths]
    if fingerprint:
        result.meta["base_fingerprint"] = fingerprint
    out = Path(out)
    with atomic_dir(out) as tmp:  # the update and its merged checkpoint land together or not at all
        result.write_into(tmp)
        if merged_checkpoint:
            full = {**w0, **apply_delta(w0, result.dense(), 1.0)}
            save_tensors(tmp / "model.safetensors", full, {"format": "pt"})
    return MergeResult(result, c, search, out)
