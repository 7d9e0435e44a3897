"""Registered suites. ``get_suite(name)`` builds one (data and heads) and caches it per process."""

from __future__ import annotations

from collections.abc import Callable

from trap2.registry import Registry
from trap2.suites.base import CosineHead, Split, Suite, Task, TaskModel

SUITES: Registry[Callable[[], Suite]] = Registry("suite")
_BUILT: dict[str, Suite] = {}


def _digits() -> Suite:
    from trap2.suites.digits import build_suite

    return build_suite()


SUITES.register("digits", _digits)


def _vision_cnn() -> Suite:
    from trap2.suites.vision_cnn import build_suite

    return build_suite()


SUITES.register("vision-cnn", _vision_cnn)


def _text_transformer() -> Suite:
    from trap2.suites.text_transformer import build_suite

    return build_suite()


SUITES.register("text-transformer", _text_transformer)


def _clip8() -> Suite:  # from local paths: $TRAP2_CLIP_MODEL, $TRAP2_CLIP8_DATA
    from trap2.suites.clip8 import build_suite

    return build_suite()


SUITES.register("clip8", _clip8)


def _math() -> Suite:  # from local paths: $TRAP2_MATH_MODEL, $TRAP2_MATH_DATA
    from trap2.suites.math_lm import build_suite

    return build_suite()


SUITES.register("math", _math)


def get_suite(name: str) -> Suite:
    builder = SUITES.get(name)
    if name not in _BUILT:
        _BUILT[name] = builder()
    return _BUILT[name]


__all__ = ["SUITES", "CosineHead", "Split", "Suite", "Task", "TaskModel", "get_suite"]
