"""The attacker grid: every fine-tuning attack (recovery of the merge, un-trapping, distillation) at every
point of learning rate × steps × samples per task × LoRA or full × optimiser × seed, each point also run
from W0 with no merge; summarised per attack by the worst case, the median, the head start and the
smallest budget that reaches 90 % of the unprotected merge.

Tamper-resistance results flip with the attacker's learning rate, steps, data and LoRA vs full, so one
setting per attack is not a measurement. Each point of an attack gives

- ``merged``: test accuracy (per task, mean) of the attack's merge on the Trap² pool, task arithmetic
  with the coefficient searched on validation (the global search):
  recover — the global optimum W0 + c·merge fine-tuned on ``samples`` labelled samples per task;
  untrap — the protected member fine-tuned with the ``flatten`` objective on ``samples`` labelled
  samples of its task, then merged; distill — the member distilled at s = 1 on ``samples`` unlabelled
  inputs into a student with the other members' mean norm (DisTaC), then merged;
- ``from_w0``: the same attack from W0, no merge: recover — W0 fine-tuned on all tasks (``mean``);
  untrap — a fresh update trained on the target task (``target``); distill — the distillation ceiling,
  a fresh LoRA distilled from the release (``target``).

Summary per attack (over every point, seeds included): ``worst`` (the attacker's best merged mean: the
defender's worst case, taken on test, so an upper bound on what a validation-picked attacker gets),
``median``, ``head_start`` (at the worst-case point: merged − from W0 on the metric from W0 has, mean
for recover, the target task for untrap and distill) and ``min_budget`` (the smallest samples, then
steps, at which some point's merged mean reaches ``THRESHOLD`` × the unprotected pool's TA merge).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trap2.attacks.context import EvalContext
from trap2.attacks.finetune import MODES, OPTIMISERS, RANK, AttackPoint, dense_of
from trap2.attacks.search import PAPER_GRID
from trap2.attacks.searches import Cell, global_optimum
from trap2.config import help_field
from trap2.errors import ConfigError
from trap2.eval.cells import CellStore, context_key, pool_key
from trap2.updates import Update

ATTACKS = ("recover", "untrap", "distill")
THRESHOLD = 0.9  # of the unprotected pool's merged mean
METRIC = {"recover": "mean", "untrap": "target", "distill": "target"}  # what from-W0 measures


@dataclass(frozen=True)
class AttackGrid:
    """The attacker's settings: the product of every field below is run for each attack."""

    attacks: tuple[str, ...] = help_field("fine-tuning attacks: recover, untrap, distill", ATTACKS)
    lrs: tuple[float, ...] = help_field("learning rates", (1e-5, 1e-4, 1e-3))
    steps: tuple[int, ...] = help_field("optimiser steps", (10, 100, 1000))
    samples: tuple[int, ...] = help_field(
        "samples per task (labelled: recover, untrap; unlabelled: distill)", (10, 100, 1000)
    )
    modes: tuple[str, ...] = help_field("lora (a rank-`rank` branch) and/or full (every weight)", MODES)
    optimisers: tuple[str, ...] = help_field("adamw and/or sgd (momentum 0.9)", OPTIMISERS)
    seeds: tuple[int, ...] = help_field("seeds of the batches (and of a fresh LoRA branch)", (0,))
    rank: int = help_field("rank of the attacker's LoRA branch", RANK)

    def __post_init__(self) -> None:
        for name in ("attacks", "lrs", "steps", "samples", "modes", "optimisers", "seeds"):
            value = tuple(getattr(self, name))
            if not value:
                raise ConfigError(f"threats grid: {name} is empty")
            object.__setattr__(self, name, value)
        for a in self.attacks:
            if a not in ATTACKS:
                raise ConfigError(f"threats grid: attack {a!r} is not one of {', '.join(ATTACKS)}")
        self.points()  # each point checks its own values

    def points(self) -> list[AttackPoint]:
        return [
            AttackPoint(float(lr), int(st), int(n), mode, opt, int(seed), self.rank)
            for lr, st, n, mode, opt, seed in itertools.product(
                self.lrs, self.steps, self.samples, self.modes, self.optimisers, self.seeds
            )
        ]


# quick: cheap enough for `trap2 demo --threats quick` and the audit; full: the whole grid (bench)
GRIDS: dict[str, AttackGrid] = {
    "quick": AttackGrid(
        lrs=(1e-3,), steps=(10, 100), samples=(10, 100), modes=("lora", "full"), optimisers=("adamw",)
    ),
    "full": AttackGrid(),
}


def get_grid(name: str) -> AttackGrid:
    if name not in GRIDS:
        raise ConfigError(f"threats: {name!r} is not one of {', '.join(GRIDS)}")
    return GRIDS[name]


def _ta(ctx: EvalContext, pool: Sequence[Update]) -> dict[str, Any]:
    """Test accuracies of the pool's best task-arithmetic merge (global search, cached per pool)."""
    best = global_optimum(Cell(ctx, tuple(pool), "ta", "full", None, PAPER_GRID))
    return {"acc": ctx.test_accs(ctx.params(best.merged, best.c)), "c": best.c, "best": best}


def _standalone(ctx: EvalContext, update: Update, task: str) -> float:
    from trap2.eval.evaluate import accuracy

    return accuracy(ctx.backbone, ctx.suite.task(task), "test", ctx.params(update.dense()))


def run_point(
    ctx: EvalContext, attack: str, pool: Sequence[Update], index: int, point: AttackPoint
) -> dict[str, Any]:
    """One attack at one point on ``pool`` (member ``index`` protected): merged and from-W0 accuracies."""
    from trap2.attacks.distill import distill_update, others_norm
    from trap2.attacks.recover import recover_at
    from trap2.attacks.untrap import untrap_at

    release = pool[index]
    target = release.meta.get("task") or ctx.tasks[index]
    task = ctx.suite.task(target)
    if attack == "recover":
        base = _ta(ctx, pool)["best"]
        scaled = {n: base.c * d for n, d in base.merged.items()}
        tasks = [ctx.suite.task(t) for t in ctx.tasks]
        merged = ctx.test_accs(ctx.params(dense_of(recover_at(ctx.backbone, tasks, ctx.w0, scaled, point))))
        zero = {n: 0 * d for n, d in scaled.items()}
        alone = ctx.test_accs(ctx.params(dense_of(recover_at(ctx.backbone, tasks, ctx.w0, zero, point))))
        from_w0 = {"mean": alone["mean"], **{t: alone[t] for t in ctx.tasks}}
        return {"merged": merged, "from_w0": from_w0, "c": base.c}
    if attack == "untrap":
        member = untrap_at(ctx.backbone, ctx.w0, release, task, point)
        fresh = untrap_at(ctx.backbone, ctx.w0, release, task, point, from_w0=True)
    elif attack == "distill":
        member = distill_update(
            ctx.backbone, ctx.w0, release, task, point, "release", others_norm(pool, index)
        )
        lora = AttackPoint(
            point.lr, point.steps, point.samples, "lora", point.optimiser, point.seed, point.rank
        )
        fresh = distill_update(ctx.backbone, ctx.w0, release, task, lora, "w0", None)
    else:
        raise ConfigError(f"threats: unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    got = _ta(ctx, [member if i == index else u for i, u in enumerate(pool)])
    return {"merged": got["acc"], "from_w0": {"target": _standalone(ctx, fresh, target)}, "c": got["c"]}


def summarise(
    points: Sequence[Mapping[str, Any]], metric: str, target: str, unprotected_mean: float
) -> dict[str, Any]:
    """Worst case, median, head start and smallest budget over one attack's points (see the module doc).

    Each point: {"point": {...samples, steps...}, "merged": {task: acc, "mean": acc}, "from_w0": {metric:
    acc}}; ``metric`` 'mean' or 'target' (the target task, named ``target``)."""
    if not points:
        raise ConfigError("threats: no points to summarise")
    means = [p["merged"]["mean"] for p in points]
    worst = max(range(len(points)), key=lambda i: means[i])
    top = points[worst]
    key = "mean" if metric == "mean" else target
    head = top["merged"][key] - top["from_w0"][metric if metric == "mean" else "target"]
    threshold = THRESHOLD * unprotected_mean
    reached = [p for p in points if p["merged"]["mean"] >= threshold]
    budget = None
    if reached:
        first = min(reached, key=lambda p: (p["point"]["samples"], p["point"]["steps"], -p["merged"]["mean"]))
        budget = {
            "samples": first["point"]["samples"],
            "steps": first["point"]["steps"],
            "point": dict(first["point"]),
            "mean": first["merged"]["mean"],
        }
    return {
        "worst": top["merged"]["mean"],
        "worst_target": top["merged"][target],
        "worst_point": dict(top["point"]),
        "median": statistics.median(means),
        "head_start": head,
        "head_start_metric": metric,
        "from_w0_at_worst": top["from_w0"][metric if metric == "mean" else "target"],
        "threshold": threshold,
        "min_budget": budget,
        "points": len(points),
    }


def run_grid(
    ctx: EvalContext,
    pools: Mapping[bool, Sequence[Update]],
    index: int,
    grid: AttackGrid,
    name: str = "custom",
    on_point: Callable[[str, AttackPoint], None] | None = None,
    store: CellStore | None = None,
) -> dict[str, Any]:
    """Every attack of ``grid`` at every point on the Trap² pool ``pools[True]``, with the references
    (the global TA merge of both pools); the report's ``threats`` entry.

    ``store``: finished points and references are read from it and new ones written to it (a stopped
    run resumes). A point's record does not depend on the grid it belongs to, so a point the ``quick``
    grid ran is reused by the ``full`` one. The wall times are those of the original computations."""
    store = store or CellStore()
    base = {**context_key(ctx), "grid": list(PAPER_GRID)}
    target = pools[True][index].meta.get("task") or ctx.tasks[index]
    ref, seconds = {}, 0.0
    for prot, pool in pools.items():

        def reference(pool: Sequence[Update] = pool) -> dict[str, Any]:
            got = _ta(ctx, pool)
            return {"acc": got["acc"], "c": got["c"]}

        ref[prot], wall = store.run({"kind": "grid_reference", **base, "pool": pool_key(pool)}, reference)
        seconds += wall
    unprotected = ref[False]["acc"]
    out: dict[str, Any] = {
        "grid": name,
        "settings": {
            "lrs": list(grid.lrs),
            "steps": list(grid.steps),
            "samples": list(grid.samples),
            "modes": list(grid.modes),
            "optimisers": list(grid.optimisers),
            "seeds": list(grid.seeds),
            "rank": grid.rank,
        },  # fmt: skip
        "target": target,
        "reference": {
            "unprotected_ta": {
                "mean": unprotected["mean"],
                "target": unprotected[target],
                "c": ref[False]["c"],
            },
            "trap2_ta": {
                "mean": ref[True]["acc"]["mean"],
                "target": ref[True]["acc"][target],
                "c": ref[True]["c"],
            },
        },
        "attacks": {},
    }
    point_key = {"kind": "grid_point", **base, "pool": pool_key(pools[True]), "index": index}
    for attack in grid.attacks:
        rows, attack_seconds = [], 0.0
        for point in grid.points():
            key = {**point_key, "attack": attack, "point": {**point.record(), "rank": point.rank}}
            got, wall = store.run(key, lambda a=attack, p=point: run_point(ctx, a, pools[True], index, p))
            attack_seconds += wall
            rows.append({"point": point.record(), **got})
            if on_point:
                on_point(attack, point)
        out["attacks"][attack] = {
            "metric": METRIC[attack],
            "summary": summarise(rows, METRIC[attack], target, unprotected["mean"]),
            "points": rows,
            "wall_seconds": attack_seconds,
        }
        seconds += attack_seconds
    out["wall_seconds"] = seconds
    return out
