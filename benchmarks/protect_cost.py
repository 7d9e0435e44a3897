"""Compute of ``trap2 protect`` against the original fine-tuning run and the from-scratch Trap² recipe.

Run:  python benchmarks/protect_cost.py --suite digits --update ADAPTER --plain-steps 600 --protect-steps 80 \\
          --scratch-steps 600 [--repair 0.5] [--lam 1] [--batch-size 64] [--rounds 5] [--steps 20] [--threads 2]
          [--out cost.json]

Compute = optimizer steps × step cost. In one process, on the same model and batch size, the step of
plain fine-tuning (objective ``none``), of the from-scratch ``trap2`` objective and of the protect phase
(``trap2_distill``, prepared by ``trap2.protect.prepare_protect`` from the given update) are timed in
interleaved rounds (so drift in the machine's speed hits each alike; the median per objective), and
the protect phase's one-off teacher pass over its inputs is timed too. Printed side by side:

- protect / original fine-tuning = (trap steps × distill step + repair steps × repair step + teacher pass)
  / (plain steps × plain step), the repair steps being the last ``--repair`` fraction (``protect.repair``:
  the teacher match alone); ``--off-fraction`` / ``--off-every`` time the cheaper trap steps of those knobs
- plain-then-protect / plain = 1 + the above
- from-scratch Trap² / plain = (scratch steps × trap2 step) / (plain steps × plain step)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def _runs(
    suite_name: str,
    update_path: str | None,
    batch: int,
    protect_batch: int,
    lam: float,
    off_fraction: float = 1.0,
    off_every: int = 1,
):
    """{objective: a prepared run of the loop} for plain, trap2 and the protect phase, and the protect run."""
    from trap2.config import ObjectiveConfig, TrainConfig
    from trap2.protect import ProtectConfig, prepare_protect
    from trap2.suites import get_suite
    from trap2.training.loop import _setup, train_update
    from trap2.updates import load_update

    suite = get_suite(suite_name)
    task = suite.default_target
    base = TrainConfig(steps=10_000, batch_size=batch, warmup_steps=1, eval_every=10_000)
    if update_path is None:  # the step cost does not depend on the adapter's values
        update = train_update(suite, task, dataclasses.replace(base, steps=1).plain()).update
    else:
        update = load_update(update_path)
        task = update.meta.get("task", task)
    runs = {
        name: _setup(
            suite, task, dataclasses.replace(base, objective=ObjectiveConfig(name=name, lam=lam)), None
        )
        for name in ("none", "trap2")
    }
    train = dataclasses.replace(
        base, batch_size=protect_batch, objective=ObjectiveConfig("trap2_distill", lam)
    )
    cfg = ProtectConfig(train=train, off_fraction=off_fraction, off_every=off_every)
    prepared = prepare_protect(suite, update, cfg, task=task, force=True)
    runs["trap2_distill"] = prepared.run
    # the repair steps (protect.repair): the teacher match alone, no off-nominal passes
    repair = prepare_protect(suite, update, cfg, task=task, force=True).run
    repair.objective.trap_steps = 0
    runs["repair"] = repair
    return suite, task, runs, prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="digits")
    ap.add_argument("--update", help="the original update (default: a throw-away one; values do not matter)")
    ap.add_argument("--plain-steps", type=int, required=True, help="steps of the original fine-tuning run")
    ap.add_argument("--protect-steps", type=int, required=True, help="steps of the protect phase")
    ap.add_argument("--scratch-steps", type=int, required=True, help="steps of the from-scratch Trap² recipe")
    ap.add_argument("--batch-size", type=int, default=64, help="batch of plain and from-scratch runs")
    ap.add_argument("--protect-batch-size", type=int, default=None, help="default: --batch-size")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument(
        "--off-fraction", type=float, default=1.0, help="protect.off_fraction of the protect phase"
    )
    ap.add_argument("--off-every", type=int, default=1, help="protect.off_every of the protect phase")
    ap.add_argument(
        "--repair",
        type=float,
        default=0.0,
        help="protect.repair: the fraction of steps that are repair steps",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps per objective per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from trap2.protect import teacher_outputs
    from trap2.training.loop import _step

    if args.steps % args.off_every:
        ap.error("--steps must be a multiple of --off-every (each round times whole cycles)")
    suite, task, runs, prepared = _runs(
        args.suite,
        args.update,
        args.batch_size,
        args.protect_batch_size or args.batch_size,
        args.lam,
        args.off_fraction,
        args.off_every,
    )
    times: dict[str, list[float]] = {name: [] for name in runs}
    step = 0
    for run in runs.values():  # warm-up: first calls allocate
        _step(run, 1)
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step += 1
                _step(run, step)
            times[name].append((time.perf_counter() - t0) / args.steps)
    step_s = {name: statistics.median(v) for name, v in times.items()}
    # the protect phase runs its teacher on the inputs it sees: at most steps × batch size of them
    x = prepared.run.task.train.x[: args.protect_steps * (args.protect_batch_size or args.batch_size)]
    teacher_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        teacher_outputs(prepared.run.model, x)
        teacher_s.append(time.perf_counter() - t0)
    teacher = statistics.median(teacher_s)

    plain = args.plain_steps * step_s["none"]
    n_trap = round(args.protect_steps * (1 - args.repair))  # as trap2.protect.trap_steps
    n_repair = args.protect_steps - n_trap
    protect = n_trap * step_s["trap2_distill"] + n_repair * step_s["repair"] + teacher
    scratch = args.scratch_steps * step_s["trap2"]
    rows = [
        ("plain fine-tuning (the original)", args.plain_steps, step_s["none"], plain),
        (
            "protect: trap steps (trap2_distill)",
            n_trap,
            step_s["trap2_distill"],
            n_trap * step_s["trap2_distill"],
        ),
        (
            "protect: repair steps (teacher match alone)",
            n_repair,
            step_s["repair"],
            n_repair * step_s["repair"],
        ),
        ("protect phase (both + teacher pass)", args.protect_steps, None, protect),
        ("plain, then protect", args.plain_steps + args.protect_steps, None, plain + protect),
        ("from-scratch Trap²", args.scratch_steps, step_s["trap2"], scratch),
    ]
    print(f"suite {args.suite}, task {task}, {args.threads} thread(s); compute = steps × median step time")
    print(f"{'run':48} {'steps':>6} {'step ms':>8} {'compute s':>10} {'× plain':>8}")
    for label, n, per, total in rows:
        per_ms = f"{1000 * per:8.2f}" if per is not None else " " * 8
        print(f"{label:48} {n:>6} {per_ms} {total:10.2f} {total / plain:8.3f}")
    print(f"teacher pass over {len(x)} inputs: {1000 * teacher:.1f} ms")
    print(f"protect / original fine-tuning = {protect / plain:.3f}  (target ≤ 0.3)")
    print(f"plain-then-protect / plain     = {(plain + protect) / plain:.3f}  (target ≤ 1.3)")
    print(f"from-scratch Trap² / plain     = {scratch / plain:.3f}")
    if args.out:
        from trap2 import __version__

        result = {
            "kind": "protect-cost",
            "command": "python " + " ".join(sys.argv),
            "version": __version__,
            "threads": args.threads,
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
            "suite": args.suite,
            "task": task,
            "step_seconds": step_s,
            "step_seconds_rounds": times,
            "teacher_pass_seconds": teacher,
            "teacher_inputs": len(x),
            "protect_settings": {
                "repair": args.repair,
                "off_fraction": args.off_fraction,
                "off_every": args.off_every,
            },
            "steps": {
                "plain": args.plain_steps,
                "protect": args.protect_steps,
                "protect_trap": n_trap,
                "protect_repair": n_repair,
                "scratch": args.scratch_steps,
            },
            "compute_seconds": {"plain": plain, "protect": protect, "scratch": scratch},
            "ratios": {
                "protect_over_plain": protect / plain,
                "plain_then_protect_over_plain": (plain + protect) / plain,
                "scratch_over_plain": scratch / plain,
            },
            "wall_seconds": time.perf_counter() - t_start,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
