"""Prepare a suite's data once into a local cache: fixed, seeded train/val/test subsets of each source,
resized to the suite's image size, stored as uint8 safetensors (atomic, digest-checked).

The cache folder is ``$TRAP2_DATA`` if set, else ``~/.cache/trap2``. After ``prepare`` nothing reads
the original sources again, and nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trap2.errors import DataError
from trap2.io import file_sha256, load_tensors, save_tensors

SPLIT_SEED = 20261123


def data_dir() -> Path:
    return Path(os.environ.get("TRAP2_DATA") or Path.home() / ".cache" / "trap2")


def env_path(variable: str, missing: str) -> Path:
    """The folder named by ``$variable``; ``missing`` (what to set it to) is the error without it."""
    value = os.environ.get(variable)
    if not value:
        raise DataError(f"{missing}: set {variable}")
    return Path(value)


def weights_fingerprint(folder: Path) -> str:
    """The fingerprint of a local model folder's safetensors weights (the first shard's sha256, and the
    shard count when there are several)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DataError(f"{folder}: no .safetensors weights")
    return file_sha256(files[0]) if len(files) == 1 else file_sha256(files[0]) + "+" + str(len(files))


def bigbench_source() -> Path:
    """Where the BIG-bench sdist is looked for: ``$TRAP2_BIGBENCH`` or the data cache's bigbench/."""
    return Path(os.environ.get("TRAP2_BIGBENCH") or data_dir() / "bigbench")


@dataclass(frozen=True)
class TaskSource:
    """One task of a suite: where its images come from and how many go into each split."""

    name: str
    # (inputs, labels), or {"train": (x, y), "test": (x, y), "classes": [...]} for a source's own split
    load: Callable[[], Any]
    n_train: int
    n_val: int
    n_test: int
    description: str = ""


def to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) → uint8 (N, 3, size, size), bilinear resize."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    x = x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def split_indices(n: int, sizes: tuple[int, int, int], seed: int) -> tuple[np.ndarray, ...]:
    if sum(sizes) > n:
        raise DataError(f"the splits ask for {sum(sizes)} examples but the source has {n}")
    perm = np.random.default_rng(seed).permutation(n)
    a, b = sizes[0], sizes[0] + sizes[1]
    return perm[:a], perm[a:b], perm[b : b + sizes[2]]


def prepare_task(
    suite: str,
    task: TaskSource,
    size: int,
    folder: Path | None = None,
    encode: Callable[[Any], torch.Tensor] | None = None,
    unit: str = "px",
) -> Path:
    """Write ``<folder>/<suite>/<task>-<size><unit>.safetensors`` (x_/y_ train, val, test).

    ``encode`` turns a split's raw inputs into the stored tensor: images resized to ``size`` px by
    default; a tokenizer to ``size`` tokens for text (``unit="tok"``).
    """
    out = (folder or data_dir()) / suite / f"{task.name}-{size}{unit}.safetensors"
    encode = encode or (lambda images: to_rgb(images, size))
    loaded = task.load()
    classes: list[str] = []
    if isinstance(loaded, dict):  # the source's own train / test split: val is carved from train
        classes = list(loaded.get("classes", []))
        (xtr, ytr), (xte, yte) = loaded["train"], loaded["test"]
        _check_pair(task.name, xtr, ytr)
        _check_pair(task.name, xte, yte)
        n_val = min(task.n_val, len(ytr) // 5)
        tr, va, _ = split_indices(len(ytr), (min(task.n_train, len(ytr) - n_val), n_val, 0), SPLIT_SEED)
        te, _, _ = split_indices(len(yte), (min(task.n_test, len(yte)), 0, 0), SPLIT_SEED)
        parts = {"train": (xtr, ytr, tr), "val": (xtr, ytr, va), "test": (xte, yte, te)}
        y = np.concatenate([ytr, yte])
    else:
        x, y = loaded
        _check_pair(task.name, x, y)
        idx = split_indices(len(y), (task.n_train, task.n_val, task.n_test), SPLIT_SEED)
        parts = {split: (x, y, i) for split, i in zip(("train", "val", "test"), idx, strict=True)}
    tensors = {}
    for split, (xs, ys, i) in parts.items():
        encoded = encode(xs[i])  # a tensor, or (inputs, targets) when the encoder makes the targets too
        x_t, y_t = (
            encoded if isinstance(encoded, tuple) else (encoded, torch.from_numpy(ys[i].astype(np.int64)))
        )
        tensors[f"x_{split}"], tensors[f"y_{split}"] = x_t, y_t
    meta = {
        "task": task.name,
        "size": str(size),
        "n_classes": str(max(len(classes), int(y.max()) + 1)),
        "source": task.description,
        **({"classes": json.dumps(classes)} if classes else {}),
    }
    save_tensors(out, tensors, {"trap2_data": json.dumps(meta, sort_keys=True)})
    return out


def _check_pair(name: str, x: Any, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{name}: no examples")


def load_prepared(
    suite: str, task: str, size: int, folder: Path | None = None, unit: str = "px"
) -> tuple[dict[str, torch.Tensor], dict]:
    path = (folder or data_dir()) / suite / f"{task}-{size}{unit}.safetensors"
    if not path.is_file():
        raise DataError(f"{suite}/{task} is not prepared ({path} missing): run  trap2 data prepare {suite}")
    tensors, header = load_tensors(path)
    return tensors, json.loads(header.get("trap2_data", "{}"))
