"""trap2: Trap² protection for fine-tuned updates (Jang et al., "Making Models Unmergeable via
Scaling-Sensitive Loss Landscape", ICML 2026), and the merging attacks it must survive.

The top-level namespace is lazy so that ``import trap2`` (and the CLI's start-up, which sets thread
policy before torch loads) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trap2Error": "trap2.errors",
    "ObjectiveConfig": "trap2.config",
    "LoraSettings": "trap2.config",
    "TrainConfig": "trap2.config",
    "Update": "trap2.updates",
    "load_update": "trap2.updates",
    "train_update": "trap2.training",
    "get_suite": "trap2.suites",
    "get_objective": "trap2.objectives",
    "get_merge_method": "trap2.merging",
    "merge_deltas": "trap2.merging",
    "search_coefficient": "trap2.attacks",
    "scaling_curve": "trap2.eval",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trap2' has no attribute {name!r}")
