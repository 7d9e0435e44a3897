"""Finished records of a long evaluation, kept on disk so that a stopped run picks up where it left off.

A record (one attack cell on one pool, one baseline cell, one attacker-grid point, ...) is stored as
``<folder>/<kind>-<hash>.json`` — ``{"key": ..., "record": ..., "wall_seconds": ...}``, written
atomically — where the hash is of the key: a JSON dict of everything that determines the record (the
kind and its settings, the pool by content, the suite and its data — every split of every task, by
content (:meth:`~trap2.suites.base.Task.eval_digest`), since attacks train on train, searches score val
and reports score test — the normalisers, the device, the package's version). A record is reused only
when the stored key equals the one asked for; a file that does not parse, or holds another key, is
recomputed with a warning. ``wall_seconds`` is the original computation's, kept on reuse.

Every record goes through JSON, also when no folder is given, so a resumed run returns the very dicts an
uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trap2.io import write_text

if TYPE_CHECKING:
    from trap2.attacks.context import EvalContext
    from trap2.suites.base import Suite
    from trap2.updates import Update

log = logging.getLogger("trap2")

# of the record format and of what a key holds: a change makes every stored record stale (2: the key
# holds the suite's data)
VERSION = 2


def pool_key(pool: Sequence[Update]) -> list[str]:
    """The pool by content, member by member (:func:`~trap2.attacks.context.update_key`)."""
    from trap2.attacks.context import update_key  # trap2.attacks uses this module

    return [update_key(u) for u in pool]


def suite_key(suite: Suite) -> dict[str, Any]:
    """What a suite brings to every record: its name, its backbone's fingerprint and its data, each task's
    every split by content (:meth:`~trap2.suites.base.Task.eval_digest`; hashed once per task, the same
    in any process): a regenerated or replaced split makes every record on the suite stale."""
    return {
        "suite": suite.name,
        "fingerprint": suite.fingerprint,
        "data": {t: suite.task(t).eval_digest() for t in suite.task_names},
    }


def context_key(ctx: EvalContext) -> dict[str, Any]:
    """What an evaluation context brings to every record: the suite and its data (:func:`suite_key`), its
    tasks in order, the normalisers of the validation score and the device."""
    return {
        **suite_key(ctx.suite),
        "tasks": list(ctx.tasks or ()),
        "normalisers": dict(ctx.normalisers),
        "device": str(ctx.device),
    }


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _full(key: Mapping[str, Any]) -> dict[str, Any]:
    """The key as stored: with the record format's and the package's version."""
    from trap2 import __version__

    return _plain({"version": VERSION, "trap2": __version__, **key})


def record_path(folder: Path, key: Mapping[str, Any]) -> Path:
    """Where the record for ``key`` lives: ``<kind>-<hash of the key>.json``."""
    blob = json.dumps(_full(key), sort_keys=True)
    return folder / f"{key['kind']}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"


class CellStore:
    """Records under ``folder`` (None: computed every time, nothing written). ``fresh``: the folder is
    cleared first, so every record is computed again. ``resumed`` / ``computed`` count this store's
    records read from disk / computed."""

    def __init__(self, folder: str | Path | None = None, fresh: bool = False) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.resumed = 0
        self.computed = 0

    def _load(self, key: Mapping[str, Any]) -> tuple[dict[str, Any], float] | None:
        if self.folder is None:
            return None
        path = record_path(self.folder, key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored["key"] != _full(key):
                log.warning("%s: written for another key; recomputed", path)
                return None
            record, seconds = stored["record"], float(stored["wall_seconds"])
            if not isinstance(record, dict):
                raise TypeError("the record is not a mapping")
            return record, seconds
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            log.warning("%s: unreadable record (%s); recomputed", path, type(e).__name__)
            return None

    def run(
        self, key: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]]
    ) -> tuple[dict[str, Any], float]:
        """The record for ``key`` and its computation's wall time: the stored one, else ``compute()``
        (timed, then stored)."""
        found = self._load(key)
        if found is not None:
            self.resumed += 1
            return found
        t0 = time.perf_counter()
        record = _plain(compute())
        seconds = time.perf_counter() - t0
        self.computed += 1
        if self.folder is not None:
            entry = {"key": _full(key), "record": record, "wall_seconds": seconds}
            write_text(record_path(self.folder, key), json.dumps(entry, indent=1) + "\n")
        return record, seconds

    def summary(self) -> str:
        total = self.resumed + self.computed
        return f"{self.resumed} of {total} finished cells resumed from {self.folder}"
