"""The pipeline that the demo, ``trap2 audit`` and ``trap2 bench`` share: train (or reuse) every task's
unprotected update and a target's protected one, cached by config (:func:`trained_pool`), then measure
standalone accuracy, the target's scaling curve acc(s), and the attack matrix (merged accuracy with and
without protection, coefficient searched on validation data) with :func:`evaluate_protection`.

Run through ``trap2 demo`` / ``audit`` / ``bench``; :func:`trap2.demo.run_demo` shows the two calls.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from trap2.attacks import DATA_METHODS, SEARCHES, TA_SEARCHES, EvalContext, attack_matrix, run_attack
from trap2.attacks.context import resolve_device
from trap2.attacks.search import PAPER_GRID
from trap2.attacks.searches import SEARCH_REGISTRY
from trap2.attacks.searches.base import per_task_method
from trap2.config import ObjectiveConfig, TrainConfig, config_hash, help_field, to_dict
from trap2.defenses import BASELINES, baseline_update
from trap2.errors import ConfigError
from trap2.eval.cells import CellStore, context_key, pool_key, suite_key
from trap2.eval.evaluate import accuracy, base_state, scaling_curve
from trap2.eval.report import write_report
from trap2.merging import SPACES, get_merge_method
from trap2.progress import LogReporter, Reporter, note
from trap2.suites.base import Suite
from trap2.training import train_update
from trap2.updates import Update, apply_delta, load_update

CELLS = "cells"  # under the output folder: the finished records a stopped run resumes from
CURVE_SCALES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class DemoConfig:
    """What the pipeline trains and attacks: the suite and target, the training recipe, the attack cells
    (method × space × search) and the scales of the curve. ``trap2 demo`` reads it from YAML and options."""

    suite: str = help_field("registered suite", "digits")
    target: str | None = help_field("task whose update is protected; null = the suite's default", None)
    tasks: tuple[str, ...] = help_field(
        "the tasks fine-tuned and merged: a subset of the suite's (empty = all); the target is one of them",
        (),
    )
    train: TrainConfig = help_field(
        "training settings shared by every run; the protected run uses train.objective",
        default_factory=lambda: TrainConfig(objective=ObjectiveConfig(name="trap2")),
    )
    methods: tuple[str, ...] = help_field(
        "merge methods to attack with (registered ones, or the data-dependent 'regmean' and "
        "'chain_of_merges': full space)",
        ("ta", "ties", "dare_ties", "tsv", "cart"),
    )
    spaces: tuple[str, ...] = help_field(
        "merge spaces (task arithmetic is the same in all: run in full only)", ("full", "knots", "core")
    )
    extra_searches: tuple[str, ...] = help_field(
        "searches besides the global one: per_task, pinned and prodistill (task arithmetic: per-member, "
        "member pinned at 1, per-layer coefficients distilled from unlabelled samples), restore (every "
        "other method: the protected member put back at its nominal scale after the merge), untrap "
        "(every method: the member fine-tuned on 100 labelled samples to work at every scale first), distill "
        "(every method: the member distilled at s = 1 on 100 unlabelled samples into a student with the other "
        "members' norm, DisTaC-style), recover10 / recover100 (every method: the merge fine-tuned on 10 / 100 labelled samples per task)",
        ("per_task", "pinned"),
    )
    hparam_search: bool = help_field(
        "also search each method's hyperparameters coordinate-wise (slower)", False
    )
    baselines: tuple[str, ...] = help_field(
        "post-hoc defenses attacked like Trap² (Transformers only): params (PaRaMS), merge_lock", ()
    )
    baseline_searches: tuple[str, ...] | None = help_field(
        "the searches the baselines are attacked with (null: every cell Trap² gets; 'global' and any "
        "of extra_searches)",
        None,
    )
    scales: tuple[float, ...] = help_field("scales s of the scaling curve", CURVE_SCALES)
    threats: str | None = help_field(
        "the attacker grid run after the matrix (docs/threats.md): 'quick', 'full', or 'none' / null = none",
        None,
        hash_default=False,
    )

    def __post_init__(self) -> None:
        if self.threats == "none":
            object.__setattr__(self, "threats", None)
        if self.threats is not None:
            from trap2.attacks.grid import get_grid

            get_grid(self.threats)  # validates the name
        if self.train.objective.name == "none":
            raise ConfigError(
                "demo: train.objective must be a protecting objective (e.g. 'trap2'), not 'none'"
            )
        for name in ("tasks", "methods", "spaces", "extra_searches", "baselines"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.target is not None and self.tasks and self.target not in self.tasks:
            raise ConfigError(f"target {self.target!r} is not among tasks {list(self.tasks)}")
        for m in self.methods:
            if m not in DATA_METHODS:
                get_merge_method(m)
        for sp in self.spaces:
            SPACES.get(sp)
        for se in self.extra_searches:
            if se not in SEARCHES or se == "global":
                raise ConfigError(
                    f"extra_searches: {se!r} is not one of {', '.join(x for x in SEARCHES if x != 'global')}"
                )
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"baselines: {b!r} is not one of {', '.join(BASELINES)}")
        if self.baseline_searches is not None:
            object.__setattr__(self, "baseline_searches", tuple(self.baseline_searches))
            for se in self.baseline_searches:
                if se != "global" and se not in self.extra_searches:
                    raise ConfigError(f"baseline_searches: {se!r} is neither 'global' nor in extra_searches")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def cells(self) -> list[tuple[str, str, str]]:
        """(method, space, search) cells: Core needs LoRA updates; TA is space-independent; data-dependent
        merges run in full space; restore applies to the merges that are not linear; restore and recovery
        need one merged model (not EMR's one per task)."""
        spaces = [sp for sp in self.spaces if sp != "core" or self.train.mode == "lora"]

        def where(m: str) -> list[str]:
            return ["full"] if m == "ta" or m in DATA_METHODS else spaces

        out = [(m, sp, "global") for m in self.methods for sp in where(m)]
        every = ("untrap", "distill", "recover10", "recover100")  # every method, TA included
        if "ta" in self.methods:
            out += [("ta", "full", se) for se in self.extra_searches if se in (*TA_SEARCHES, *every)]
        for se in self.extra_searches:
            if se == "restore" or se in every:
                one = SEARCH_REGISTRY.get(se).one_model  # not for a merge that is one model per task (EMR)
                out += [
                    (m, sp, se)
                    for m in self.methods
                    if m != "ta" and not (one and per_task_method(m))
                    for sp in where(m)
                ]
        return out


def update_cache_key(suite: Suite, task: str, cfg: TrainConfig) -> str:
    """The cache key of ``task``'s update under ``cfg`` on ``suite``: the suite, its backbone, the task,
    the digest of the task's training data (:meth:`Task.data_digest`: a regenerated or edited dataset
    retrains) and the config. The frozen head is not hashed: the suites derive it from W0 and the train
    split, and its float values may differ in the last bits between thread counts."""
    # checkpointing does not change the result (resume is bit-identical): not part of the key
    data = suite.task(task).data_digest()
    return config_hash(
        suite.name, suite.fingerprint, task, data, dataclasses.replace(cfg, checkpoint_every=None)
    )


def update_cache_folder(suite: Suite, task: str, cfg: TrainConfig, cache: Path) -> Path:
    key = update_cache_key(suite, task, cfg)
    return cache / f"{suite.name}-{task}-{cfg.mode}-{cfg.objective.name}-{key}"


def trained_update(
    suite: Suite,
    task: str,
    cfg: TrainConfig,
    cache: Path,
    fresh: bool = False,
    reporter: Reporter | None = None,
) -> Update:
    """Train (or reuse the cached) update for ``task`` under ``cfg``. With ``cfg.checkpoint_every`` the
    run checkpoints next to the cache entry and an interrupted run resumes from there."""
    folder = update_cache_folder(suite, task, cfg, cache)
    if folder.is_dir() and not fresh:
        return load_update(folder)
    ckpt = folder.with_name(folder.name + ".checkpoint")
    if fresh:
        shutil.rmtree(ckpt, ignore_errors=True)
    resume = cfg.checkpoint_every is not None and ckpt.is_dir()
    reporter = reporter or LogReporter()
    with reporter.stage(f"train {task} ({cfg.objective.name}, {cfg.mode})", cfg.run_steps) as advance:
        last = [0]

        def progress(step: int, _row: Mapping[str, float]) -> None:
            advance(step - last[0])
            last[0] = step

        result = train_update(
            suite, task, cfg, progress, checkpoint_dir=ckpt if cfg.checkpoint_every else None, resume=resume
        )
    result.update.save(folder, peft_model=result.peft_model)
    shutil.rmtree(ckpt, ignore_errors=True)  # the finished update replaces the checkpoint
    return result.update


def _mean(accs: Mapping[str, float]) -> dict[str, float]:
    return {**accs, "mean": sum(accs.values()) / len(accs)}


def trained_pool(
    suite: Suite,
    target: str,
    train: TrainConfig,
    cache: Path,
    fresh: bool,
    reporter: Reporter,
    given: Mapping[str, Update] | None = None,
) -> tuple[dict[str, Update], Update]:
    """Every task's plain update (``train`` with objective 'none'; ``given`` ones are taken as they are)
    and the target's protected one."""
    plain_cfg = train.plain()
    given = given or {}
    updates = {
        t: given[t] if t in given else trained_update(suite, t, plain_cfg, cache, fresh, reporter)
        for t in suite.task_names
    }
    return updates, trained_update(suite, target, train, cache, fresh, reporter)


def _attack_pool(
    suite_name: str,
    tasks: tuple[str, ...],
    normalisers: Mapping[str, float],
    cfg: DemoConfig,
    pools: Mapping[bool, list[Update]],
    target_index: int,
    cells_folder: str,
) -> tuple[list[dict[str, Any]], int]:
    """One worker's share of the attack matrix: every cell on the pools given (a worker process), and how
    many of them were read from ``cells_folder``."""
    from trap2.suites import get_suite

    suite = get_suite(suite_name).subset(tasks)
    ctx = EvalContext(suite, normalisers, device=cfg.train.device)
    store = CellStore(cells_folder)
    return attack_matrix(ctx, pools, cfg.cells(), target_index, cfg.hparam_search, store=store), store.resumed


def evaluate_protection(
    suite: Suite,
    target: str,
    updates: Mapping[str, Update],
    protected: Update,
    cfg: DemoConfig,
    out: Path,
    reporter: Reporter,
    t0: float,
    extra: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
    fresh: bool = False,
    cells: str | Path | None = None,
) -> dict[str, Any]:
    """Standalone accuracy, the target's scaling curve and the attack matrix of a protected update
    against the unprotected pool ``updates`` (one per task); writes the report to ``out``.

    Every finished piece (the standalone numbers, each attack cell on each pool, each baseline cell, each
    attacker-grid point and reference) is kept under ``out/cells`` (:mod:`trap2.eval.cells`), keyed by
    the pool's content, the suite's data (every split) and the settings that make it: a stopped run, run
    again, computes only what is missing and writes the same report. ``fresh``: those records are
    cleared first. ``cells``: keep them there instead (``trap2 bench`` shares one folder between its
    targets, so the unprotected pool's cells are computed once).

    ``executor`` (:func:`trap2.workers.worker_pool`): attack the two pools there, one job each (each
    worker rebuilds the suite from ``cfg.suite`` and ``suite.task_names``)."""
    tasks = suite.task_names
    device = resolve_device(cfg.train.device)
    backbone = suite.make_backbone().to(device)  # evaluation runs where it is
    w0 = base_state(backbone)
    for name, u in [*updates.items(), ("protected", protected)]:
        u.check_base(w0, suite.fingerprint, where=f"update {name}")
    store = CellStore(out / CELLS if cells is None else cells, fresh)

    def acc_at(delta: Mapping[str, torch.Tensor], task: str, split: str, c: float = 1.0) -> float:
        return accuracy(backbone, suite.task(task), split, apply_delta(w0, delta, c))

    def standalone() -> dict[str, Any]:
        dense = {t: u.dense() for t, u in updates.items()}
        prot_dense = protected.dense()
        return {
            "zero_shot": _mean({t: accuracy(backbone, suite.task(t), "test") for t in tasks}),
            "unprotected": _mean({t: acc_at(dense[t], t, "test") for t in tasks}),
            "ft_val": {t: acc_at(dense[t], t, "val") for t in tasks},
            "protected": acc_at(prot_dense, target, "test"),
            "curve_unprotected": scaling_curve(backbone, suite.task(target), dense[target], cfg.scales),
            "curve_protected": scaling_curve(backbone, suite.task(target), prot_dense, cfg.scales),
        }

    key = {"kind": "standalone", **suite_key(suite), "tasks": tasks}
    key |= {"device": str(device), "pool": pool_key([updates[t] for t in tasks]), "target": target}
    key |= {"protected": pool_key([protected]), "scales": list(cfg.scales)}
    first, _ = store.run(key, standalone)
    ft_val = first["ft_val"]

    ctx = EvalContext(suite, ft_val, device=cfg.train.device)
    pools = {
        False: [updates[t] for t in tasks],
        True: [protected if t == target else updates[t] for t in tasks],
    }
    cells = cfg.cells()
    with reporter.stage("attack: merge + coefficient search", 2 * len(cells)) as advance:
        if executor is not None:
            from trap2.workers import run_parallel

            jobs = [
                (cfg.suite, tuple(tasks), ft_val, cfg, {p: pools[p]}, tasks.index(target), str(store.folder))
                for p in pools
            ]
            done = run_parallel(_attack_pool, jobs, executor, lambda _i: advance(len(cells)))
            by_pool = {p: records for p, (records, _) in zip(pools, done, strict=True)}
            attacks = [by_pool[p][i] for i in range(len(cells)) for p in pools]
            resumed = sum(n for _, n in done)
            store.resumed += resumed
            store.computed += len(attacks) - resumed
        else:
            attacks = attack_matrix(
                ctx, pools, cells, tasks.index(target), cfg.hparam_search, lambda _r: advance(1), store
            )

    baselines = []
    if cfg.baselines:
        i = tasks.index(target)
        b_cells = [c for c in cells if cfg.baseline_searches is None or c[2] in cfg.baseline_searches]
        with reporter.stage("attack: post-hoc baselines", len(cfg.baselines) * len(b_cells)) as advance:
            for name in cfg.baselines:
                w0_cpu = {n: t.cpu() for n, t in w0.items()}  # the defenses work on the CPU copies
                defended = baseline_update(suite, updates[target], name, w0_cpu)
                pool = [defended if t == target else updates[t] for t in tasks]
                base = {"kind": "baseline", **context_key(ctx), "pool": pool_key(pool), "defense": name}
                base |= {"protected_index": i, "hparam_search": cfg.hparam_search, "grid": list(PAPER_GRID)}
                for method, space, search in b_cells:
                    key = {**base, "method": method, "space": space, "search": search}
                    attack = partial(
                        run_attack, ctx, pool, method, space, search, i, hparam_search=cfg.hparam_search
                    )
                    rec, _ = store.run(key, attack)
                    rec["defense"] = name
                    baselines.append(rec)
                    advance(1)

    threats = None
    if cfg.threats is not None:
        from trap2.attacks.grid import get_grid, run_grid

        grid = get_grid(cfg.threats)
        n = len(grid.attacks) * len(grid.points())
        with reporter.stage(f"threats: attacker grid ({cfg.threats})", n) as advance:
            threats = run_grid(
                ctx, pools, tasks.index(target), grid, cfg.threats, lambda _a, _p: advance(1), store
            )
    if store.resumed:
        note(reporter, store.summary())

    report = {
        "suite": suite.name,
        "target": target,
        "tasks": tasks,
        "seed": cfg.train.seed,
        "zero_shot": first["zero_shot"],
        "standalone": {"unprotected": first["unprotected"], "protected": {target: first["protected"]}},
        "scaling_curve": {
            "s": list(cfg.scales),
            "unprotected": first["curve_unprotected"],
            "protected": first["curve_protected"],
        },
        "attacks": attacks,
        **({"baselines": baselines} if baselines else {}),
        **({"threats": threats} if threats is not None else {}),
        "config": to_dict(cfg),
        "wall_seconds": time.perf_counter() - t0,
        **(extra or {}),
    }
    write_report(report, out)
    return report
