"""Suites by name. ``get_suite(name)`` builds one (data and heads) and caches it per process.

A name is one of:
- a built-in suite registered here (``digits``, ``vision-cnn``, ...);
- ``package.module:function``: the function is imported and called with no arguments and must return a
  :class:`Suite` (build it with :func:`make_suite`; see docs/custom_suite.md);
- the name of an entry point in the ``trap2.suites`` group of an installed package
  (``[project.entry-points."trap2.suites"] my-suite = "my_pkg.suites:build"``), loaded the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from trap2.errors import ConfigError, UnknownNameError
from trap2.registry import Registry
from trap2.suites.base import CosineHead, Split, Suite, Task, TaskModel
from trap2.suites.make import make_suite

ENTRY_POINT_GROUP = "trap2.suites"

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


def _lm() -> Suite:  # offline: the shipped character-level Llama and generated GSM8K-format tasks
    from trap2.suites.lm import build_suite

    return build_suite()


SUITES.register("lm", _lm)


def plugin_suites() -> dict[str, str]:
    """{name: "module:function"} of the installed ``trap2.suites`` entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def is_suite_name(name: str) -> bool:
    """Whether ``name`` names a suite: registered, ``module:function``, or an installed entry point."""
    return name in SUITES or ":" in name or name in plugin_suites()


def suite_builder(name: str) -> Callable[[], Suite]:
    """The function that builds the suite ``name`` (see the module docstring for the kinds of names)."""
    if name in SUITES:
        return SUITES.get(name)
    if ":" in name:
        return _import_builder(name, name)
    plugins = plugin_suites()
    if name in plugins:
        return _import_builder(plugins[name], f"entry point {name!r} ({ENTRY_POINT_GROUP})")
    valid = ", ".join([*SUITES.names(), *sorted(plugins)])
    raise UnknownNameError(f"unknown suite {name!r}; valid: {valid}, or package.module:function")


def _import_builder(spec: str, where: str) -> Callable[[], Suite]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"suite {where}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"suite {where}: {module_name!r} has no function {attr!r}")

    def build() -> Suite:
        suite = fn()
        if not isinstance(suite, Suite):
            raise ConfigError(f"suite {where}: {spec}() returned {type(suite).__name__}, not a Suite")
        return suite

    return build


def get_suite(name: str) -> Suite:
    builder = suite_builder(name)
    if name not in _BUILT:
        _BUILT[name] = builder()
    return _BUILT[name]


__all__ = [
    "SUITES",
    "CosineHead",
    "Split",
    "Suite",
    "Task",
    "TaskModel",
    "get_suite",
    "is_suite_name",
    "make_suite",
    "plugin_suites",
]
