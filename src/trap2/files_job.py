"""``trap2 audit`` / ``trap2 bench`` on a model folder and data files instead of a built-in suite.

Each task is given as ``NAME=ADAPTER_DIR:DATA`` (``NAME=:DATA``: a task with data but no adapter, whose
unprotected update is trained when the pool needs one). The suite is built by
:func:`trap2.suites.files.files_suite` from the base folder and the data; the adapters are the pool.

Run:  trap2 audit --base MODEL_DIR --task sst=adapters/sst:data/sst.jsonl --task ag=adapters/ag:data/ag.jsonl \\
          --protected sst --out runs/audit
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trap2.errors import ConfigError, DataError, UpdateFileError
from trap2.progress import Reporter
from trap2.suites.base import Suite
from trap2.suites.files import TaskFiles

SCORINGS = ("auto", "loglik", "exact")


def parse_task(spec: str) -> TaskFiles:
    """``NAME=ADAPTER_DIR:DATA`` (ADAPTER_DIR may be empty) as a :class:`TaskFiles`; the adapter and data
    must exist. A path that itself holds ':' is found by trying each split point."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or ":" not in rest:
        raise ConfigError(f"--task {spec!r}: expected NAME=ADAPTER_DIR:DATA (ADAPTER_DIR may be empty)")
    cuts = [i for i, c in enumerate(rest) if c == ":"]
    options = [(rest[:i], rest[i + 1 :]) for i in cuts]
    fits = [(a, d) for a, d in options if (not a or Path(a).exists()) and Path(d).exists()]
    adapter, data = fits[0] if fits else options[0]
    if not data:
        raise ConfigError(f"--task {spec!r}: no DATA after ':'")
    if not Path(data).exists():
        raise DataError(f"--task {name}: data {data}: no such file or folder")
    if adapter and not Path(adapter).exists():
        raise UpdateFileError(f"--task {name}: adapter {adapter}: no such file or folder")
    return TaskFiles(name=name, data=Path(data), adapter=Path(adapter) if adapter else None)


def parse_tasks(specs: Sequence[str]) -> list[TaskFiles]:
    tasks = [parse_task(s) for s in specs]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--task: task {twice[0]!r} is given twice")
    if len(tasks) < 2:
        raise ConfigError(f"--task: a merge needs at least two tasks, got {len(tasks)}")
    return tasks


@dataclass(frozen=True)
class FilesOptions:
    """How the suite is read from the files (the options of ``trap2 audit/bench --base``)."""

    scoring: str = "auto"  # causal LMs: 'loglik' (answer log-likelihood) or 'exact' (greedy generation)
    seed: int = 0  # carving of validation/test data from files without their own splits
    batch_size: int = 64  # batch size of the suite's feature and evaluation passes
    device: str = "cpu"  # where the suite computes its heads ('auto': CUDA when available)
    max_len: int = 128  # tokens per text (classification) or prompt + answer (causal LM)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ConfigError(f"--scoring {self.scoring!r}: valid: {', '.join(SCORINGS)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.max_len < 2:
            raise ConfigError(f"--max-len must be ≥ 2, got {self.max_len}")


def build_suite(base: Path, tasks: Sequence[TaskFiles], options: FilesOptions) -> Suite:
    """The suite of ``tasks`` on the model folder ``base`` (Part A's ``files_suite``)."""
    from trap2.attacks.context import resolve_device
    from trap2.suites import files

    if not Path(base).is_dir():
        raise ConfigError(f"--base {base}: not a model folder")
    return files.files_suite(
        Path(base),
        list(tasks),
        scoring=options.scoring,
        seed=options.seed,
        batch_size=options.batch_size,
        max_len=options.max_len,
        device=str(resolve_device(options.device)),
    )


def protected_task(tasks: Sequence[TaskFiles], protected: str | None, recorded: str | None = None) -> str:
    """The task whose update is audited: ``--protected``, else the audited update's recorded task."""
    names = [t.name for t in tasks]
    name = protected or recorded
    if name is None:
        raise ConfigError("--protected NAME: name the task whose adapter is audited")
    if name not in names:
        raise ConfigError(f"--protected {name!r}: not one of the tasks {', '.join(names)}")
    return name


def run_files_audit(
    base: Path,
    specs: Sequence[str],
    cfg: Any,
    out: Path,
    *,
    protected: str | None = None,
    update: Path | None = None,
    options: FilesOptions = FilesOptions(),
    fresh: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Audit on ``base`` with the tasks ``specs``: the audited update is ``update`` if given (the protected
    task's own adapter then being its unprotected reference in the pool), else the protected task's
    adapter (its unprotected reference is then trained on its data). Every other task's adapter is its
    pool member; a task without one gets a trained unprotected update."""
    from trap2.audit import run_audit
    from trap2.updates import load_update

    tasks = parse_tasks(specs)
    recorded = load_update(update).meta.get("task") if update is not None else None
    target = protected_task(tasks, protected, recorded)
    by_name = {t.name: t for t in tasks}
    if update is None:
        update = by_name[target].adapter
        if update is None:
            raise ConfigError(
                f"--protected {target}: the task has no adapter to audit (NAME=ADAPTER_DIR:DATA)"
            )
    adapters = {t.name: t.adapter for t in tasks if t.adapter is not None and t.adapter != update}
    suite = build_suite(base, tasks, options)
    cfg = dataclasses.replace(cfg, suite=suite.name, target=target)
    return run_audit(
        update, cfg, out, task=target, fresh=fresh, reporter=reporter, suite=suite, adapters=adapters
    )


def run_files_bench(
    base: Path,
    specs: Sequence[str],
    cfg: Any,
    out: Path,
    *,
    options: FilesOptions = FilesOptions(),
    fresh: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """``trap2 bench`` on ``base`` with the tasks ``specs``: the given adapters are the unprotected pool
    (the others are trained) and each target's protected update is trained on its data."""
    from trap2.bench import run_bench

    tasks = parse_tasks(specs)
    for t in cfg.targets:
        if t != "all":
            protected_task(tasks, t)
    suite = build_suite(base, tasks, options)
    cfg = dataclasses.replace(cfg, suite=suite.name)
    adapters = {t.name: t.adapter for t in tasks if t.adapter is not None}
    return run_bench(cfg, out, fresh=fresh, reporter=reporter, suite=suite, adapters=adapters)
