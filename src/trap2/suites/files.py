"""PLACEHOLDER for issue #24 Part A (the files suite): only the shared ``TaskFiles`` type and the
``files_suite`` signature of the contract, so that the CLI (Part C) can be written and tested against
them. The merge replaces this module with Part A's implementation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trap2.suites.base import Suite


@dataclass(frozen=True)
class TaskFiles:
    name: str
    data: Path  # a file (.jsonl/.csv) or a folder (ImageFolder tree, datasets folder, train/val/test files)
    adapter: Path | None = None  # the task's released update (PEFT folder or trap2 delta); may be None


def files_suite(
    base: Path,
    tasks: Sequence[TaskFiles],
    *,
    name: str | None = None,
    scoring: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_len: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
) -> Suite:
    raise NotImplementedError("trap2.suites.files is Part A's placeholder until the merge")
