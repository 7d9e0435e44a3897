"""``trap2 bench``: the paper's experiment on a suite in one resumable command.

For each fine-tuning mode (LoRA, full) and each protected target (the suite's default, chosen tasks, or
every task in turn): every task's unprotected update, the target's Trap²-protected update, standalone
accuracy, the target's scaling curve and the attack matrix (coefficient searched on validation), as in
the demo. Updates are cached under ``OUT/updates`` (training checkpoints every ``checkpoint_every`` steps
and resumes after an interruption); each finished (mode, target) cell writes its own report under
``OUT/<mode>/<target>/`` and is skipped when the command is run again with the same settings. The summary
goes to ``OUT/bench.json`` and ``OUT/bench.md``.

Each suite carries its training recipe per mode (``Suite.recipes``); ``lora`` / ``full`` in the config
replace it.

Run:  trap2 bench --suite vision-cnn --out runs/bench-vision-cnn
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trap2.attacks.context import resolve_device, update_key
from trap2.config import TrainConfig, config_hash, from_dict, help_field, to_dict
from trap2.errors import ConfigError
from trap2.eval.cells import CellStore, pool_key, suite_key
from trap2.eval.evaluate import accuracy, base_state
from trap2.eval.report import _table, pct, provenance
from trap2.eval.threats import threats_lines
from trap2.io import write_json, write_text
from trap2.pipeline import CELLS, CURVE_SCALES, DemoConfig, evaluate_protection, trained_pool, trained_update
from trap2.progress import LogReporter, Reporter, note
from trap2.suites import get_suite
from trap2.suites.base import Suite
from trap2.updates import Update, apply_delta, load_update

MODES = ("lora", "full")


@dataclass(frozen=True)
class BenchConfig:
    suite: str = help_field("registered suite", "digits")
    modes: tuple[str, ...] = help_field("fine-tuning modes to run: lora, full", MODES)
    targets: tuple[str, ...] = help_field(
        "tasks protected (each in turn); empty = the suite's default target; ['all'] = every task", ()
    )
    tasks: tuple[str, ...] = help_field(
        "the tasks fine-tuned and merged: a subset of the suite's (empty = all)", ()
    )
    lora: TrainConfig | None = help_field("LoRA training settings; null = the suite's recipe", None)
    full: TrainConfig | None = help_field("full fine-tuning settings; null = the suite's recipe", None)
    methods: tuple[str, ...] = help_field("merge methods to attack with", ("ta", "ties", "tsv", "cart"))
    spaces: tuple[str, ...] = help_field("merge spaces", ("full",))
    extra_searches: tuple[str, ...] = help_field(
        "searches besides the global one: per_task, pinned, prodistill, restore, untrap, recover10, recover100 (see DemoConfig)",
        (),
    )
    hparam_search: bool = help_field("also search each method's hyperparameters (slower)", False)
    baselines: tuple[str, ...] = help_field(
        "post-hoc defenses attacked like Trap² (Transformer suites): params (PaRaMS), merge_lock", ()
    )
    baseline_searches: tuple[str, ...] | None = help_field(
        "the searches the baselines get (null: all; see DemoConfig)", None
    )
    scales: tuple[float, ...] = help_field("scales s of the scaling curve", CURVE_SCALES)
    threats: str | None = help_field(
        "the attacker grid of every cell (docs/threats.md): 'full' (the default: hours on digits), 'quick', "
        "or 'none' / null = the attack matrix alone (the CLI's --threats)",
        "full",
        hash_default=False,
    )
    equal_steps: bool = help_field(
        "also train each target's plain update for as many optimizer steps as its protected run and report "
        "its test accuracy beside the protected one (the equal-steps reference; the merges still use the "
        "plain recipe's pool)",
        False,
        hash_default=False,
    )
    device: str | None = help_field(
        "where training and evaluation run ('cpu', 'cuda', 'cuda:N', 'auto'); null = the train configs'", None
    )

    def __post_init__(self) -> None:
        if self.threats == "none":
            object.__setattr__(self, "threats", None)
        for name in ("modes", "targets", "tasks", "methods", "spaces", "extra_searches", "baselines"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"modes must be a non-empty subset of {', '.join(MODES)}; got {self.modes}")
        for mode in MODES:
            cfg = getattr(self, mode)
            if cfg is not None and cfg.mode != mode:
                raise ConfigError(f"{mode}: its train config says mode={cfg.mode!r}")
            if cfg is not None and cfg.objective.name == "none":
                raise ConfigError(f"{mode}.objective must be a protecting objective, not 'none'")

    def train_config(self, suite: Suite, mode: str) -> TrainConfig:
        """This mode's settings: the config's own, else the suite's recipe over the defaults."""
        given = getattr(self, mode)
        if given is None:
            base = to_dict(TrainConfig(mode=mode))
            recipe = dict(suite.recipes.get(mode, {}))
            for key in ("objective", "lora"):
                base[key] = {**base[key], **recipe.pop(key, {})}
            given = from_dict(TrainConfig, {**base, **recipe, "mode": mode}, f"{suite.name} recipe {mode}")
        return given if self.device is None else dataclasses.replace(given, device=self.device)

    def demo_config(self, suite: Suite, mode: str, target: str) -> DemoConfig:
        return DemoConfig(
            suite=self.suite,
            target=target,
            tasks=self.tasks,
            train=self.train_config(suite, mode),
            methods=self.methods,
            spaces=self.spaces,
            extra_searches=self.extra_searches,
            hparam_search=self.hparam_search,
            baselines=self.baselines,
            baseline_searches=self.baseline_searches,
            scales=self.scales,
            threats=self.threats,
        )

    def target_list(self, suite: Suite) -> list[str]:
        if not self.targets:
            return [suite.default_target]
        if self.targets == ("all",):
            return suite.task_names
        for t in self.targets:
            suite.task(t)  # validates the name
        return list(self.targets)


def _cell_key(suite: Suite, demo: DemoConfig, given: Mapping[str, Update] | None = None) -> str:
    """A finished cell is reused only for the same settings, the same pool of tasks (a suite that
    gained tasks redoes its cells; the trained updates are cached apart and reused), the same data
    (:meth:`Task.eval_digest` of each task: every split, since a cell's report scores val and test and
    its attacks train on train) and the same given updates (by content)."""
    parts: list[Any] = [suite.name, suite.fingerprint, suite.task_names, demo]
    parts.append({t: suite.task(t).eval_digest() for t in suite.task_names})
    if given:
        parts.append({t: update_key(u) for t, u in sorted(given.items())})
    return config_hash(*parts)


def run_bench(
    cfg: BenchConfig,
    out: str | Path,
    fresh: bool = False,
    reporter: Reporter | None = None,
    *,
    suite: Suite | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every (mode, target) cell; return and write the summary.

    ``suite``: the suite to run on (default: the registered ``cfg.suite``), e.g. one built from a model
    folder and data files; ``adapters`` ({task: update folder}): updates taken as those tasks' unprotected
    pool members instead of training them (checked against the base before anything is trained)."""
    t0 = time.perf_counter()
    reporter = reporter or LogReporter()
    out = Path(out)
    suite = (suite if suite is not None else get_suite(cfg.suite)).subset(cfg.tasks)
    given = {t: load_update(p) for t, p in (adapters or {}).items()}
    if given:
        w0 = base_state(suite.make_backbone())
        for t, u in given.items():
            suite.task(t)  # validates the name
            u.check_base(w0, suite.fingerprint, where=str(adapters[t]))  # type: ignore[index]
        del w0
    targets = cfg.target_list(suite)
    cache = out / "updates"
    cells: list[dict[str, Any]] = []
    for mode in cfg.modes:
        # one record store per mode, shared by its targets: the unprotected pool is the same for every
        # target, so its attack cells are computed once (records are keyed by the pool's content)
        shared = out / mode / CELLS
        if fresh:
            shutil.rmtree(shared, ignore_errors=True)
        for target in targets:
            demo = cfg.demo_config(suite, mode, target)
            folder = out / mode / target
            key = _cell_key(suite, demo, given)
            done = _finished(folder, key)
            if done is not None and not fresh:
                note(reporter, f"{mode} / {target}: finished earlier, reused")
                report = done
            else:
                updates, protected = trained_pool(suite, target, demo.train, cache, fresh, reporter, given)
                pool = {t: ("given" if t in given else "trained") for t in suite.task_names}
                report = evaluate_protection(
                    suite, target, updates, protected, demo, folder, reporter, time.perf_counter(),
                    {"bench_key": key, "mode": mode, "pool": pool}, cells=shared,
                )  # fmt: skip
            cell = _summary(mode, report)
            if cfg.equal_steps:
                cell["plain_equal_steps"] = equal_steps_plain(
                    suite, target, demo.train, cache, shared, fresh, reporter, report
                )
            cells.append(cell)
    summary = {
        **provenance("bench"),
        "suite": suite.name,
        "tasks": suite.task_names,
        "targets": targets,
        "cells": cells,
        "config": to_dict(cfg),
        "train": {m: to_dict(cfg.train_config(suite, m)) for m in cfg.modes},
        "wall_seconds_this_run": time.perf_counter() - t0,
    }
    summary["wall_seconds"] = summary["wall_seconds_this_run"]
    write_json(out / "bench.json", summary)
    write_text(out / "bench.md", bench_markdown(summary))
    return summary


def equal_steps_plain(
    suite: Suite,
    target: str,
    train: TrainConfig,
    cache: Path,
    cells: Path,
    fresh: bool,
    reporter: Reporter,
    report: Mapping[str, Any],
) -> dict[str, Any]:
    """The equal-compute reference of a protected run: ``target``'s plain update trained for the protected
    run's optimizer steps (cached with the other updates) and its test accuracy (a record in ``cells``).
    When the recipe gives both runs the same steps it is the pool's own member, read from ``report``."""
    steps = train.run_steps
    plain = train.plain()
    if plain.run_steps == steps:
        return {"steps": steps, "acc": report["standalone"]["unprotected"][target], "same_as_pool": True}
    cfg = dataclasses.replace(plain, steps=steps)
    update = trained_update(suite, target, cfg, cache, fresh, reporter)
    device = resolve_device(cfg.device)

    def evaluate() -> dict[str, float]:  # the backbone is built only when the record is not stored
        backbone = suite.make_backbone().to(device)
        w0 = base_state(backbone)
        update.check_base(w0, suite.fingerprint, where=f"equal-steps update {target}")
        return {"acc": accuracy(backbone, suite.task(target), "test", apply_delta(w0, update.dense()))}

    key = {"kind": "equal_steps", **suite_key(suite), "device": str(device)}
    key |= {"update": pool_key([update]), "target": target}
    record, _ = CellStore(cells).run(key, evaluate)
    return {"steps": steps, "acc": record["acc"], "same_as_pool": False}


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a broken report is redone, not trusted
    return report if report.get("bench_key") == key else None


def _summary(mode: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of one (mode, target) report that the bench table shows."""
    target = report["target"]
    curve = report["scaling_curve"]

    def at(s: float) -> float | None:
        return curve["protected"][curve["s"].index(s)] if s in curve["s"] else None

    merges: dict[str, dict[str, Any]] = {}
    for a in report["attacks"]:
        label = a["method"] if a["space"] == "full" else f"{a['method']}/{a['space']}"
        if a["search"] != "global":
            label += f" ({a['search']})"
        side = "protected" if a["protected"] else "unprotected"
        merges.setdefault(label, {})[side] = {"mean": a["acc"]["mean"], "target": a["acc"][target]}
    return {
        "mode": mode,
        "target": target,
        "zero_shot": report["zero_shot"],
        "fine_tuned": report["standalone"]["unprotected"],
        "protected": report["standalone"]["protected"][target],
        "acc_s0.5": at(0.5),
        "acc_s2": at(2.0),
        "merges": merges,
        "threats": threats_lines(dict(report)),
        "wall_seconds": report.get("wall_seconds"),
    }


def _merges(cell: Mapping[str, Any], methods: list[str], key: str) -> list[str]:
    """Each method's merged ``key`` ('mean' or 'target') in a bench cell, unprotected → protected."""
    pairs = [cell["merges"].get(m, {}) for m in methods]
    return [
        f"{pct(p.get('unprotected', {}).get(key))} → {pct(p.get('protected', {}).get(key))}" for p in pairs
    ]


def bench_mode_tables(summary: Mapping[str, Any]) -> dict[str, str]:
    """{mode: its table}: a row per protected target, merged means unprotected → protected;
    ``<mode>-target``: the protected task's own accuracy in each merge, unprotected → protected, beside its
    zero-shot accuracy (denial: the protected pool should leave it there); and
    ``<mode>-<target>-threats`` for each cell with stronger threats."""
    tables: dict[str, str] = {}
    for mode in summary["config"]["modes"]:
        cells = [c for c in summary["cells"] if c["mode"] == mode]
        if not cells:
            continue
        methods = list(dict.fromkeys(m for c in cells for m in c["merges"]))
        zs, ft = cells[0]["zero_shot"], cells[0]["fine_tuned"]
        equal = any("plain_equal_steps" in c for c in cells)
        head = ["protected task", "zero-shot", "fine-tuned", "Trap²", "s=0.5", "s=2", *methods]
        rows = [
            [c["target"], pct(zs[c["target"]]), pct(ft[c["target"]]), pct(c["protected"]), pct(c["acc_s0.5"]),
             pct(c["acc_s2"]), *_merges(c, methods, "mean")]
            for c in cells
        ]  # fmt: skip
        if equal:  # the equal-steps plain reference beside the protected run
            head.insert(4, "plain, equal steps")
            for row, c in zip(rows, cells, strict=True):
                ref = c.get("plain_equal_steps")
                row.insert(4, f"{pct(ref['acc'])} ({ref['steps']})" if ref else "")
        tables[mode] = _table(head, rows)
        rows = [[c["target"], pct(zs[c["target"]]), *_merges(c, methods, "target")] for c in cells]
        tables[f"{mode}-target"] = _table(["protected task", "zero-shot", *methods], rows)
        for c in cells:
            if c.get("threats"):
                tables[f"{mode}-{c['target']}-threats"] = "\n".join(ln for ln in c["threats"][2:] if ln)
    return tables


def bench_markdown(summary: Mapping[str, Any]) -> str:
    """One table per mode: a row per protected target, merged means unprotected → protected."""
    tables = bench_mode_tables(summary)
    lines = [f"# trap2 bench: suite {summary['suite']}", ""]
    lines.append(
        "Test accuracy %. Merges: mean over all tasks of the merged model, coefficient searched on "
        "validation, unprotected pool → pool with the target protected (Trap²)."
    )
    for mode in summary["config"]["modes"]:
        cells = [c for c in summary["cells"] if c["mode"] == mode]
        if not cells:
            continue
        zs, ft = cells[0]["zero_shot"], cells[0]["fine_tuned"]
        lines += ["", f"## {mode}", ""]
        lines.append(
            f"Zero-shot mean {pct(zs['mean'])}; fine-tuned standalone mean {pct(ft['mean'])}"
            + (
                f"; protected standalone mean {pct(sum(c['protected'] for c in cells) / len(cells))} "
                f"vs fine-tuned {pct(sum(ft[c['target']] for c in cells) / len(cells))} on the same "
                f"{len(cells)} target(s)."
            )
        )
        refs = [c for c in cells if c.get("plain_equal_steps")]
        if refs:
            gap = sum(c["protected"] - c["plain_equal_steps"]["acc"] for c in refs) / len(refs)
            gap = round(100 * gap, 1) + 0.0  # + 0.0: no "-0.0"
            lines.append(
                f"Protected − plain at equal optimizer steps, mean of {len(refs)} target(s): "
                f"{gap:+.1f} pp (the plain reference trained for the protected run's steps)."
            )
        lines += ["", tables[mode]]
        lines += ["", "The protected task's own accuracy in each merge, unprotected → protected:", ""]
        lines += [tables[f"{mode}-target"]]
        for c in cells:
            if c.get("threats"):
                lines += ["", f"### {mode}, `{c['target']}` protected: stronger threats", ""]
                lines += [ln for ln in c["threats"][1:] if ln]  # the table without its own heading
    return "\n".join(lines) + "\n"
