"""One progress helper: library code reports stages through a ``Reporter``; the CLI draws them."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

log = logging.getLogger("trap2")

Advance = Callable[[int], None]


class Reporter(Protocol):
    def stage(self, description: str, total: int) -> contextlib.AbstractContextManager[Advance]: ...


def note(reporter: Reporter, text: str) -> None:
    """One line through ``reporter``: a stage of one step, done at once."""
    with reporter.stage(text, 1) as advance:
        advance(1)


class LogReporter:
    """Default: one log line per stage, no drawing."""

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        log.info("%s", description)
        yield lambda n=1: None


class LineReporter:
    """Progress as plain lines on a stream that is not a terminal (a log file, CI, ``nohup``): the stage
    when it starts, ``k/n`` at most every ``every`` seconds, and the stage's wall time when it ends."""

    def __init__(self, stream: TextIO | None = None, every: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = every

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Advance]:
        start = last = time.monotonic()
        done = 0
        self._say(f"{description} ({total})")

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                self._say(f"  {description}: {done}/{total}, {now - start:.0f} s")

        yield advance
        self._say(f"  {description}: done in {time.monotonic() - start:.1f} s")


def cli_reporter() -> RichReporter | LineReporter:
    """The CLI's reporter: bars on a terminal, plain lines elsewhere (where a live bar would print
    nothing until the end)."""
    from rich.console import Console

    return RichReporter() if Console(stderr=True).is_terminal else LineReporter()


class RichReporter:
    """Progress bars on the terminal."""

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
