"""``distill``: the protected member replaced by a student distilled from it at s = 1 on unlabelled
samples of its task, its norm matched to the other members' mean (DisTaC-style,
:mod:`trap2.attacks.distill`), then the global search on the pool with it. The record's ``ceiling`` is
the distillation ceiling: a fresh LoRA distilled from the same member on the same budget, used alone
(test accuracy on its task, no merge)."""

from __future__ import annotations

from collections.abc import Sequence

from trap2.attacks.context import EvalContext, update_key
from trap2.attacks.finetune import AttackPoint
from trap2.attacks.searches.base import Cell, Found, GlobalOptimum, search
from trap2.updates import Update

SAMPLES = 100  # unlabelled inputs of the member's task
STEPS = 100


def default_point(ctx: EvalContext, release: Update, seed: int = 0) -> AttackPoint:
    """The registered search's student: LoRA for a LoRA release (else every weight), AdamW at the
    suite's fine-tuning lr for that mode, ``STEPS`` steps on ``SAMPLES`` unlabelled inputs."""
    mode = "lora" if release.kind == "lora" else "full"
    lr = ctx.suite.recipes.get(mode, {}).get("lr", 5e-3 if mode == "lora" else 1e-3)
    return AttackPoint(lr=float(lr), steps=STEPS, samples=SAMPLES, mode=mode, seed=seed)  # type: ignore[arg-type]


def distilled(ctx: EvalContext, pool: Sequence[Update], index: int, point: AttackPoint) -> Update:
    """The student of ``pool[index]`` at ``point``, norm matched to the others (once per content)."""
    from trap2.attacks.distill import distill_update, others_norm

    member = pool[index]
    norm = others_norm(pool, index)
    task = ctx.suite.task(member.meta.get("task") or ctx.tasks[index])

    def compute() -> Update:
        return distill_update(ctx.backbone, ctx.w0, member, task, point, "release", norm)

    return ctx.cached(("distilled", update_key(member), round(norm, 9), point), compute)


def ceiling(ctx: EvalContext, member: Update, task_name: str, point: AttackPoint) -> float:
    """Test accuracy on ``task_name`` of a fresh LoRA distilled from ``member`` at ``point``, alone."""
    from trap2.attacks.distill import distill_update
    from trap2.eval.evaluate import accuracy

    task = ctx.suite.task(task_name)
    lora = AttackPoint(point.lr, point.steps, point.samples, "lora", point.optimiser, point.seed, point.rank)

    def compute() -> float:
        student = distill_update(ctx.backbone, ctx.w0, member, task, lora, "w0", None)
        return accuracy(ctx.backbone, task, "test", ctx.params(student.dense()))

    return ctx.cached(("distill_ceiling", update_key(member), lora), compute)


def distilled_pool(cell: Cell) -> Sequence[Update]:
    """The pool with the protected member's student; the context remembers which release each student
    came from (by content), for the ceiling the search reports."""
    ctx, p = cell.ctx, cell.protected
    release = cell.pool[p]
    student = distilled(ctx, cell.pool, p, default_point(ctx, release))
    ctx.cached(("distill_release", update_key(student)), lambda: release)
    return [student if i == p else u for i, u in enumerate(cell.pool)]


@search(
    "distill",
    summary="the protected member distilled at s = 1 into a norm-matched student (DisTaC), then the global search",
    needs_protected=True,
    prepare=distilled_pool,
)
def distill(cell: Cell, best: GlobalOptimum) -> Found:
    ctx, p = cell.ctx, cell.protected
    student = cell.pool[p]  # the prepared pool holds the student; its meta names the release's task
    task = student.meta.get("task") or ctx.tasks[p]
    info = student.meta["distilled"]
    point = AttackPoint(
        info["lr"], info["steps"], info["samples"], info["mode"], info["optimiser"], info["seed"]
    )
    release = ctx.cached(("distill_release", update_key(student)), lambda: None)
    extra: dict[str, object] = {"distill": {**point.record(), "norm": info["norm"]}}
    if release is not None:  # set by the prepare step
        extra["ceiling"] = {task: ceiling(ctx, release, task, point)}
    return Found(best.score, ctx.params(best.merged, best.c), best.c, [best.c] * len(cell.pool), extra)
