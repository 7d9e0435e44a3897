"""A suite from a local Hugging Face model folder and data files (one task per file or folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskFiles:
    name: str
    data: Path  # a file (.jsonl/.csv) or a folder (ImageFolder tree, a datasets save_to_disk folder, or a folder with train/val/test files)
    adapter: Path | None = None  # the task's released update (PEFT folder or trap2 delta); may be None
