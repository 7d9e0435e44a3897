"""Merge attacks on a pool of updates: merge (method × space) and search the coefficients on the
suite's validation split, then report test accuracy. Three searches:

- ``global``: W0 + c·merge(ΔW_1..ΔW_T), c over the paper's grid (early stop 10); with
  ``hparam_search`` the method's own hyperparameters are then searched coordinate-wise over their grids
  (each value: one merge, then the coefficient search again).
- ``per_task``: W0 + merge(c_1·ΔW_1, …, c_T·ΔW_T), coordinate ascent over each c_i from the global
  optimum (two sweeps over ``PER_TASK_GRID``); never worse than ``global`` on validation.
- ``pinned``: the protected member fixed at its nominal scale, the others' common coefficient searched:
  W0 + merge(ΔW_p, c·ΔW_j≠p).
- ``restore``: after a non-linear merge, the protected member's remnant removed and the member added
  back at scale 1 (``restore_member``); the others' coefficient searched.
- ``untrap``: the protected member fine-tuned alone on k labelled samples to work at every scale
  (``attacks.untrap``), then the global search.
- ``prodistill``: task arithmetic with one coefficient per member and tensor, learned from the global
  optimum by distilling each member's standalone features on unlabelled samples
  (``attacks.prodistill``); the better of the two on validation is kept.
- ``recover10`` / ``recover100``: the global optimum fine-tuned on 10 / 100 labelled samples per task
  (``attacks.recover``).

The merged delta is computed once per hyperparameter setting for ``global``; each coefficient point is
one evaluation (no re-merge, no model copy). Task arithmetic is linear, so per-member weights never
re-merge either; for the other methods each ``per_task``/``pinned`` point is one merge and one evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from trap2.attacks.search import PAPER_GRID, search_coefficient
from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy, base_state
from trap2.merging import INTERNAL_HPARAMS, get_merge_method, merge_updates
from trap2.suites.base import Suite
from trap2.updates import Update, apply_delta

SEARCHES = ("global", "per_task", "pinned", "restore", "untrap", "prodistill", "recover10", "recover100")
# searches that re-weight members inside the merge (``prodistill``: per tensor, task arithmetic only)
TA_SEARCHES = ("per_task", "pinned", "prodistill")
# merges that need data besides the deltas (not in the pure-math registry); full space only
DATA_METHODS = ("regmean",)
PER_TASK_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@dataclass
class EvalContext:
    """Evaluation plumbing for one suite: W0 once, the normalisers (unprotected fine-tuned val accuracy).

    Each pool's global search is remembered, so set the normalisers before the first attack."""

    suite: Suite
    normalisers: Mapping[str, float]
    tasks: Sequence[str] | None = None  # default: every task of the suite

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks or self.suite.task_names)
        self.backbone = self.suite.make_backbone().eval()
        self.w0 = base_state(self.backbone)
        self.evaluations = 0
        self._untrapped: dict[int, tuple[Update, Update]] = {}  # id(update) -> (update kept alive, result)
        # (ids of the pool's updates, method, space, hparam_search) -> (pool kept alive, c, score, hp, n)
        self._global: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._from_w0: dict[tuple[Any, ...], dict[str, float]] = {}
        custom = any(self.suite.task(t).evaluate is not None for t in self.tasks)
        self._stacked = {} if custom else {split: self._stack(split) for split in ("val", "test")}

    def _stack(self, split: str) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
        """Every task's inputs in one batch (one forward per evaluation), with each task's slice."""
        xs, spans, start = [], [], 0
        for t in self.tasks:
            x = self.suite.task(t).split(split).x
            xs.append(x)
            spans.append((t, start, start + len(x)))
            start += len(x)
        return torch.cat(xs), spans

    @torch.no_grad()
    def accuracies(self, params: Mapping[str, torch.Tensor], split: str) -> dict[str, float]:
        if not self._stacked:  # tasks with their own metric (e.g. exact match of generated answers)
            return {t: accuracy(self.backbone, self.suite.task(t), split, params) for t in self.tasks}
        x, spans = self._stacked[split]
        feats = functional_call(self.backbone, dict(params), (x,), strict=False)
        out = {}
        for t, a, b in spans:
            task = self.suite.task(t)
            out[t] = int((task.head(feats[a:b]).argmax(-1) == task.split(split).y).sum()) / (b - a)
        return out

    def untrapped(self, update: Update) -> Update:
        """``update`` un-trapped on k labelled samples of its task (once per update)."""
        from trap2.attacks.untrap import untrap

        if id(update) not in self._untrapped:
            self._untrapped[id(update)] = (update, untrap(self.suite, update, update.meta["task"]))
        return self._untrapped[id(update)][1]

    def recovered_from_w0(self, k: int, names: Sequence[str]) -> dict[str, float]:
        """Test accuracies of W0 itself after the recovery fine-tuning (the reference a merge must beat
        to be worth anything to an attacker with k labelled samples per task); once per k and tensors."""
        from trap2.attacks.recover import recover

        key = (k, tuple(sorted(names)))
        if key not in self._from_w0:
            zero = {n: torch.zeros_like(self.w0[n]) for n in key[1]}
            self._from_w0[key] = self.test_accs(
                self.params(recover(self.suite, self.tasks, self.w0, zero, k, backbone=self.backbone))
            )
        return self._from_w0[key]

    def params(self, delta: Mapping[str, torch.Tensor], c: float = 1.0) -> dict[str, torch.Tensor]:
        return apply_delta(self.w0, delta, c)

    def val_score(self, params: Mapping[str, torch.Tensor]) -> float:
        """Mean normalised validation accuracy over the suite's tasks."""
        self.evaluations += 1
        accs = self.accuracies(params, "val")
        return sum(accs[t] / max(self.normalisers[t], 1e-8) for t in accs) / len(accs)

    def test_accs(self, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
        accs = self.accuracies(params, "test")
        return {**accs, "mean": sum(accs.values()) / len(accs)}


def restore_member(
    merged: Mapping[str, torch.Tensor], member: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``merged`` without the member's component: per tensor, minus its least-squares projection a·ΔW.

    TIES and DARE shrink each member by an amount the attacker does not control; removing what is left
    of the protected update lets it be added back at its nominal scale (the "restore" search)."""
    rest = {}
    for n, m in merged.items():
        d = member.get(n)
        if d is None:
            rest[n] = m
            continue
        a = (m.double() * d.double()).sum() / (d.double() * d.double()).sum().clamp_min(1e-30)
        rest[n] = m - a.to(m.dtype) * d
    return rest


def _pool_tasks(ctx: EvalContext, pool: Sequence[Update]) -> list[str]:
    """Each member's task: its own metadata, else the suite's task at its position."""
    return [u.meta.get("task") or ctx.tasks[i] for i, u in enumerate(pool)]


def _unlabelled_inputs(ctx: EvalContext, pool: Sequence[Update], n: int) -> list[torch.Tensor]:
    """The first ``n`` training inputs of each member's task (labels never read)."""
    return [ctx.suite.task(t).train.x[:n] for t in _pool_tasks(ctx, pool)]


def _regmean_merged(ctx: EvalContext, pool: Sequence[Update]) -> dict[str, torch.Tensor]:
    from trap2.attacks.regmean import N_SAMPLES, regmean_delta

    inputs = _unlabelled_inputs(ctx, pool, N_SAMPLES)
    return regmean_delta(ctx.backbone, ctx.w0, [u.dense() for u in pool], inputs)


def _merge_fn(pool: Sequence[Update], method: str, space: str, hp: Mapping[str, Any]):
    """weights -> merged dense delta; linear (no re-merge) for task arithmetic."""
    if method == "ta":
        dense = [u.dense() for u in pool]

        def linear(weights: Sequence[float]) -> dict[str, torch.Tensor]:
            names = dict.fromkeys(n for d in dense for n in d)
            return {n: sum(w * d[n] for w, d in zip(weights, dense, strict=True) if n in d) for n in names}

        return linear
    return lambda weights: merge_updates(pool, method, space, weights=list(weights), **hp).dense()


def run_attack(
    ctx: EvalContext,
    pool: Sequence[Update],
    method: str,
    space: str = "full",
    search: str = "global",
    protected_index: int | None = None,
    hparams: Mapping[str, Any] | None = None,
    hparam_search: bool = False,
    grid: Sequence[float] = PAPER_GRID,
) -> dict[str, Any]:
    """One cell of the attack matrix: the best merge the attacker finds on validation, scored on test."""
    if search not in SEARCHES:
        raise ConfigError(f"unknown search {search!r}; valid: {', '.join(SEARCHES)}")
    if search == "untrap":  # the member un-trapped on k labelled samples first, then the global search
        if protected_index is None:
            raise ConfigError("search='untrap' needs the index of the protected member")
        pool = [ctx.untrapped(u) if i == protected_index else u for i, u in enumerate(pool)]
        rec = run_attack(ctx, pool, method, space, "global", protected_index, hparams, hparam_search, grid)
        return {**rec, "search": "untrap"}
    if search == "prodistill" and method != "ta":
        raise ConfigError(f"search={search!r} runs with task arithmetic ('ta') only, not {method!r}")
    data_method = method in DATA_METHODS
    if data_method and (space != "full" or search in TA_SEARCHES):
        raise ConfigError(f"{method} runs in full space with the global or restore search only")
    m = None if data_method else get_merge_method(method)
    hp = (
        {}
        if m is None
        else {k: v for k, v in m.resolve(**(hparams or {})).items() if k not in INTERNAL_HPARAMS}
    )
    n_eval0 = ctx.evaluations
    extra: dict[str, Any] = {}

    def merge_at(hp_: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return (
            _regmean_merged(ctx, pool) if data_method else merge_updates(pool, method, space, **hp_).dense()
        )

    def global_search(hp_: Mapping[str, Any]) -> tuple[float, float, dict[str, torch.Tensor]]:
        merged = merge_at(hp_)  # once per hyperparameter setting
        found = search_coefficient(lambda c: ctx.val_score(ctx.params(merged, c)), grid)
        return found.coefficient, found.score, merged

    # every search starts from the global optimum: found once per pool and cell, then reused (its
    # evaluations still counted in each record that builds on it)
    key = (tuple(id(u) for u in pool), method, space, hparam_search, tuple(sorted(hp.items())), tuple(grid))
    if key in ctx._global:
        _, c, score, hp, n_global = ctx._global[key]
        n_eval0 -= n_global  # the record's budget includes the global search it builds on
        merged = merge_at(hp)
    else:
        c, score, merged = global_search(hp)
        if hparam_search and m is not None:
            for name, spec in m.hparams.items():
                for value in spec.grid:
                    if value == hp[name]:
                        continue
                    trial = {**hp, name: value}
                    c2, s2, merged2 = global_search(trial)
                    if s2 > score:
                        c, score, merged, hp = c2, s2, merged2, trial
        ctx._global[key] = (tuple(pool), c, score, hp, ctx.evaluations - n_eval0)
    coefficients: list[float] = [c] * len(pool)
    params = ctx.params(merged, c)

    if search == "per_task":
        fn = _merge_fn(pool, method, space, hp)
        weights = [c] * len(pool)
        for _sweep in range(2):
            improved = False
            for i in range(len(pool)):
                for w in PER_TASK_GRID:
                    if w == weights[i]:
                        continue
                    trial = weights[:i] + [w] + weights[i + 1 :]
                    s = ctx.val_score(ctx.params(fn(trial)))
                    if s > score:
                        score, weights, improved = s, trial, True
            if not improved:
                break
        coefficients = weights
        params = ctx.params(fn(weights))
    elif search == "pinned":
        if protected_index is None:
            raise ConfigError("search='pinned' needs the index of the protected member")
        fn = _merge_fn(pool, method, space, hp)
        weights_at = lambda c_: [1.0 if i == protected_index else c_ for i in range(len(pool))]  # noqa: E731
        found = search_coefficient(lambda c_: ctx.val_score(ctx.params(fn(weights_at(c_)))), grid)
        score, coefficients = found.score, weights_at(found.coefficient)
        c = found.coefficient
        params = ctx.params(fn(coefficients))
    elif search == "prodistill":
        from trap2.attacks.prodistill import N_SAMPLES, distill_coefficients, merged_delta

        dense = [u.dense() for u in pool]
        inputs = _unlabelled_inputs(ctx, pool, N_SAMPLES)
        coef, names, _ = distill_coefficients(ctx.backbone, ctx.w0, dense, inputs, init=c)
        distilled = ctx.params(merged_delta(dense, coef, names))
        s = ctx.val_score(distilled)
        if s > score:  # the attacker keeps whichever merge validates better
            score, params = s, distilled
            coefficients = [float(v) for v in coef.mean(1)]  # per member, averaged over tensors
    elif search in ("recover10", "recover100"):
        from trap2.attacks.recover import recover

        k = int(search.removeprefix("recover"))
        scaled = {n: c * d for n, d in merged.items()}
        params = ctx.params(
            recover(ctx.suite, _pool_tasks(ctx, pool), ctx.w0, scaled, k, backbone=ctx.backbone)
        )
        score = ctx.val_score(params)
        extra["from_w0"] = ctx.recovered_from_w0(k, list(merged))
    elif search == "restore":
        if protected_index is None:
            raise ConfigError("search='restore' needs the index of the protected member")
        member = pool[protected_index].dense()
        rest = restore_member(merged, member)  # the merge at its best hyperparameters, member removed
        names = dict.fromkeys([*rest, *member])

        def restored(c_: float) -> dict[str, torch.Tensor]:
            return {n: c_ * rest.get(n, 0) + member.get(n, 0) for n in names}

        found = search_coefficient(lambda c_: ctx.val_score(ctx.params(restored(c_))), grid)
        score, c = found.score, found.coefficient
        coefficients = [1.0 if i == protected_index else c for i in range(len(pool))]
        params = ctx.params(restored(c))

    return {
        "method": method,
        "space": space,
        "search": search,
        "coefficient": c,
        "coefficients": coefficients,
        "hparams": dict(hp),
        "val_score": score,
        "evaluations": ctx.evaluations - n_eval0,
        "acc": ctx.test_accs(params),
        **extra,
    }


def attack_matrix(
    ctx: EvalContext,
    pools: Mapping[bool, Sequence[Update]],
    cells: Sequence[tuple[str, str, str]],
    protected_index: int | None = None,
    hparam_search: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (method, space, search) cell on each pool ({protected: pool}); same budget for both."""
    out = []
    for method, space, search in cells:
        for is_protected, pool in pools.items():
            rec = run_attack(ctx, pool, method, space, search, protected_index, hparam_search=hparam_search)
            rec["protected"] = is_protected
            out.append(rec)
            if on_cell:
                on_cell(rec)
    return out
