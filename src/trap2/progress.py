"""One progress helper: library code reports stages through a ``Reporter``; the CLI draws them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger("trap2")

Advance = Callable[[int], None]


class Reporter(Protocol):
    def stage(self, description: str, total: int) -> contextlib.AbstractContextManager[Advance]: ...


class LogReporter:
    """Default: one log line per stage, no drawing."""

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        log.info("%s", description)
        yield lambda n=1: None


class RichReporter:
    """Progress bars on the terminal (used by the CLI)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )

    def __enter__(self) -> RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        tid = self.progress.add_task(description, total=total)
        try:
            yield lambda n=1: self.progress.advance(tid, n)
        finally:
            self.progress.update(tid, completed=total)
