"""Step time and peak memory of each registered objective vs plain fine-tuning, side by side.

Run:  python benchmarks/step_time.py [--suite digits|vision-cnn] [--steps 30] [--rounds 5] [--threads 1] [--part all|steps|tap]

Same model (the suite's backbone + a task head), batch, optimizer (AdamW) for every objective; LoRA and
full fine-tuning. Suites: ``digits`` (102k-parameter ViT, batch 64) and ``vision-cnn`` (the pretrained
EfficientNet-Lite0, 4.65 M parameters, 32 px, batch 32; needs ``trap2 data prepare vision-cnn``). Objectives are timed in interleaved rounds (plain, trap2, trap2_split, plain, …) so
drift in the machine's speed hits each alike; the median step time per objective is printed as a ratio
to plain. Peak memory: each objective runs alone in a child process at batch 4096 (so activations,
not start-up, set the peak) and its peak RSS above the same process's start-up is compared. A
reference row times plain fine-tuning run as two half-batch calls: the floor of a step that, like
trap2_split under full fine-tuning, runs its nominal and off-nominal halves as separate calls.

Feature tap (``--part tap``): peak memory of one two-pass ``trap2`` step (collateral 0, full fine-tuning)
on a random causal LM, whose backbone output is its B×L×V logits, with the feature tap held around the
whole step (how the step ran before it registered the tap only where collateral reads it) vs as the
objective runs now. Both run in child processes, side by side; on ``--device cuda`` the peak is
``torch.cuda.max_memory_allocated`` above the start, on CPU the peak RSS above the start.
  python benchmarks/step_time.py --part tap [--lm-batch 8 --lm-seq 128 --lm-vocab 32000] [--device cuda]

Extensions (``--part extensions``): one optimizer step of plain fine-tuning (``none``) beside the paper's
``trap2`` and ``trap2`` under each hardening extension alone (``law``, ``bound``, ``collateral``,
``n_samples``, each operator, the operator family, the lookahead against each attacker), and the protect
phase's ``trap2_distill`` step (against the model's own outputs at the start as the teacher's; with
``off_every = 2, off_fraction = 0.5`` averaged over the steps, half of which are the teacher match alone:
``--steps`` must then be even). The same model, batch and optimizer for all, LoRA and full fine-tuning,
timed in interleaved rounds; median ms per step and the ratio to plain; ``--out`` writes the JSON
(kind ``step-time-extensions``, rendered by ``trap2 report``).
  flock /tmp/trap2-compute.lock env OMP_NUM_THREADS=2 python benchmarks/step_time.py --part extensions \
      --steps 20 --rounds 5 --threads 2 --out results/step-time-extensions.json

Recipes (``--part recipes``): what each suite's ``trap2 bench`` recipe costs to train. Per suite and mode,
the recipe's protected step (its objective, batch, LoRA settings) beside the plain step of the same
recipe, timed in interleaved rounds; the JSON (kind ``step-time-recipes``) states the step ratio, the
recipe's steps on both sides and the protected run's total compute in plain-step units (protected steps ×
step ratio), against the plain recipe's steps and against plain at equal steps.
  flock /tmp/trap2-compute.lock env OMP_NUM_THREADS=2 python benchmarks/step_time.py --part recipes \
      --recipe-suites digits,vision-cnn,text-transformer --steps 10 --rounds 5 --threads 2 \
      --out results/step-time-recipes.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

OBJECTIVES = ("none", "trap2", "trap2_split")
# a reference timed beside them: plain fine-tuning run as two half-batch calls (no scaling at all), the
# floor for trap2_split's full fine-tuning step, which runs the nominal and off-nominal halves separately
HALVES = "none_halves"
# per suite: (training batch, memory batch); the memory batch is large enough that activations, not
# start-up, set the peak
BATCHES = {"digits": (64, 4096), "vision-cnn": (32, 256)}
# --part extensions: (variant, ObjectiveConfig fields, protect knobs); the paper is trap2's defaults and
# each extension is one setting changed from it. The first variant is the plain step the others divide by.
OPERATORS_ALONE = ("layer_scale", "trim", "drop", "spectral", "isotropic")
FAMILY = "scale,layer_scale,trim,spectral"  # the family of docs/hardening.md's results
EXTENSIONS: tuple[tuple[str, dict[str, Any], dict[str, Any] | None], ...] = (
    ("none (plain)", {"name": "none"}, None),
    ("trap2 (the paper)", {}, None),
    ("law=log", {"law": "log"}, None),
    ("bound=3", {"bound": 3.0}, None),
    ("collateral=0.3", {"collateral": 0.3}, None),
    ("n_samples=2", {"n_samples": 2}, None),
    *((f"operators={op}", {"operators": op}, None) for op in OPERATORS_ALONE),
    (f"operators={FAMILY}", {"operators": FAMILY}, None),
    ("lookahead_steps=1, recover", {"lookahead_steps": 1, "lookahead_objective": "recover"}, None),
    ("lookahead_steps=1, flatten", {"lookahead_steps": 1, "lookahead_objective": "flatten"}, None),
    ("trap2_distill (protect)", {"name": "trap2_distill"}, None),
    (
        "trap2_distill, off_every=2, off_fraction=0.5",
        {"name": "trap2_distill"},
        {"off_every": 2, "off_fraction": 0.5},
    ),
)


def make_step(
    mode: str,
    objective: str | Any,
    batch: int,
    suite_name: str = "digits",
    protect: dict[str, Any] | None = None,
    train: Any = None,
) -> Callable[[], None]:
    """One optimizer step (AdamW, clipping at 1) of ``objective`` on the suite's backbone + task head.

    ``objective``: an ``ObjectiveConfig``, a registered name (its default settings) or ``HALVES``.
    ``trap2_distill`` is the protect phase's step (``trap2.protect.protect_objective``; ``protect``: the
    ``ProtectConfig`` knobs such as ``off_every``), trained against the model's own outputs at the start
    as the teacher's. ``train``: the ``TrainConfig`` whose LoRA settings wrap the backbone (default: the
    defaults)."""
    from trap2.config import ObjectiveConfig, TrainConfig
    from trap2.objectives import get_objective
    from trap2.scaling import ScaledModel, base_params
    from trap2.suites import get_suite
    from trap2.suites.base import TaskModel
    from trap2.training.loop import wrap_lora

    halved = objective == HALVES
    if isinstance(objective, str):
        objective = ObjectiveConfig(name="none" if halved else objective)
    suite = get_suite(suite_name)
    task = suite.task(suite.default_target)
    cfg = train if train is not None else TrainConfig(mode=mode)
    backbone = suite.make_backbone()
    backbone = wrap_lora(backbone, suite, cfg) if mode == "lora" else backbone.requires_grad_(True)
    model = TaskModel(backbone, task.head)
    scaled = ScaledModel(model, mode, base_params(model) if mode == "full" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    reps = -(-batch // len(task.train))
    x = task.train.x.repeat(reps, *[1] * (task.train.x.dim() - 1))[:batch]
    y = task.train.y.repeat(reps)[:batch]
    if objective.name == "trap2_distill":
        from trap2.protect import ProtectConfig, protect_objective, teacher_outputs

        knobs = ProtectConfig(train=TrainConfig(mode=mode, objective=objective), **(protect or {}))
        obj = protect_objective(knobs)
        y = teacher_outputs(model, x)  # (N, C): the teacher's outputs, as the protect phase trains on
    else:
        obj = get_objective(objective)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        obj.backward(scaled, x, y, task.loss, gen)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def halves() -> None:  # plain fine-tuning in two half-batch calls: the floor of any split-call step
        opt.zero_grad(set_to_none=True)
        h = len(y) // 2
        task.loss(torch.cat([model(x[:h]), model(x[h:])]), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return halves if halved else step


def interleaved(fns: dict[str, Callable[[], None]], steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each step function, one value per round: each round runs ``steps`` calls of
    every function in turn, so drift in the machine's speed hits each alike (after 5 warm-up calls)."""
    for fn in fns.values():  # warm-up
        for _ in range(5):
            fn()
    per: dict[str, list[float]] = {o: [] for o in fns}
    for _ in range(rounds):
        for o, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            per[o].append((time.perf_counter() - t0) / steps)
    return per


def timings(mode: str, steps: int, rounds: int, suite: str) -> dict[str, float]:
    fns = {o: make_step(mode, o, BATCHES[suite][0], suite) for o in (*OBJECTIVES, HALVES)}
    return {o: statistics.median(v) for o, v in interleaved(fns, steps, rounds).items()}


def _child(mode: str, objective: str, steps: int, suite: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    fn = make_step(mode, objective, BATCHES[suite][1], suite)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        fn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)


def _in_child(call: str, threads: int) -> float:
    """Run ``step_time.<call>`` in a fresh process; the KiB it prints last, as MiB."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import step_time; step_time.{call}"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_THREADS": str(threads)},
    )
    return float(r.stdout.strip().splitlines()[-1]) / 1024


def peak_memory(mode: str, objective: str, steps: int, threads: int, suite: str) -> float:
    return _in_child(f"_child({mode!r}, {objective!r}, {steps}, {suite!r})", threads)  # MiB


TAPS = ("always", "when_used")  # the feature tap held around the whole step (before), or as trap2 runs now


def make_lm_step(tap: str, batch: int, seq: int, vocab: int, device: str):
    """One trap2 step (collateral 0, full fine-tuning) on a random 2-layer Llama: the backbone output
    the tap would hold is the (batch, seq, vocab) logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trap2.config import ObjectiveConfig
    from trap2.objectives import get_objective
    from trap2.objectives.trap2 import feature_tap
    from trap2.scaling import ScaledModel, base_params
    from trap2.suites.base import CrossEntropy, TaskModel
    from trap2.suites.math_lm import IGNORE, CausalLMBackbone, NextTokenHead

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
    )
    model = TaskModel(CausalLMBackbone(LlamaForCausalLM(cfg)), NextTokenHead()).to(device)
    scaled = ScaledModel(model, "full", base_params(model))
    obj, loss = get_objective(ObjectiveConfig(name="trap2")), CrossEntropy(IGNORE)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    x = torch.stack([ids, torch.ones_like(ids)], dim=1).to(device)  # (B, 2, L) [ids; mask]
    y = ids[:, 1:].clone()
    y[:, : seq // 2] = IGNORE  # the prompt half is not a target
    y = y.to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with feature_tap(scaled) if tap == "always" else contextlib.nullcontext():
            obj.backward(scaled, x, y, loss, gen)

    return step


def _lm_child(tap: str, batch: int, seq: int, vocab: int, device: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    step = make_lm_step(tap, batch, seq, vocab, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - start) / 1024)  # KiB, as ru_maxrss
        return
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)


def tap_memory(batch: int, seq: int, vocab: int, device: str, threads: int) -> dict[str, float]:
    """Peak MiB above the start of one trap2 step per tap setting, each in its own process."""
    return {
        tap: _in_child(f"_lm_child({tap!r}, {batch}, {seq}, {vocab}, {device!r})", threads) for tap in TAPS
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--suite", choices=sorted(BATCHES), default="digits")
    ap.add_argument(
        "--part",
        choices=("all", "steps", "tap", "extensions", "recipes"),
        default="all",
        help="'all': steps and tap",
    )
    ap.add_argument(
        "--recipe-suites",
        default="digits,vision-cnn,text-transformer",
        help="--part recipes: the suites whose bench recipes are timed, comma-separated",
    )
    ap.add_argument("--lm-batch", type=int, default=8)
    ap.add_argument("--lm-seq", type=int, default=128)
    ap.add_argument("--lm-vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu", help="device of the feature-tap measurement")
    ap.add_argument("--out", type=Path, help="--part extensions / recipes: write the result JSON here")
    args = ap.parse_args()
    if args.part == "extensions" and args.steps % 2:
        ap.error("--part extensions: --steps must be even (off_every=2 times whole cycles)")
    if args.out is not None and args.part not in ("extensions", "recipes"):
        ap.error("--out is written by --part extensions or recipes")
    torch.set_num_threads(args.threads)
    if args.part == "extensions":
        extension_table(args)
    if args.part == "recipes":
        recipe_table(args)
    if args.part in ("all", "steps"):
        step_table(args)
    if args.part in ("all", "tap"):
        mem = tap_memory(args.lm_batch, args.lm_seq, args.lm_vocab, args.device, args.threads)
        logits_mib = args.lm_batch * args.lm_seq * args.lm_vocab * 4 / 2**20
        print(
            f"trap2 step (collateral 0) on a random Llama, batch {args.lm_batch} × {args.lm_seq} tokens, "
            f"vocab {args.lm_vocab} (one fp32 logits tensor: {logits_mib:.0f} MiB), {args.device}: "
            f"peak MiB tap always {mem['always']:.1f}, tap when used {mem['when_used']:.1f}, "
            f"ratio {mem['always'] / max(mem['when_used'], 1e-9):.2f}"
        )


def step_table(args: argparse.Namespace) -> None:
    batch, mem_batch = BATCHES[args.suite]
    print(
        f"{args.suite} backbone, batch {batch}, {args.threads} thread(s); "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    print(
        f"{'mode':6} {'objective':12} {'ms/step':>8} {'× plain':>8} {f'peak MiB @{mem_batch}':>15} {'× plain':>8}"
    )
    for mode in ("lora", "full"):
        t = timings(mode, args.steps, args.rounds, args.suite)
        mem = {o: peak_memory(mode, o, args.steps, args.threads, args.suite) for o in OBJECTIVES}
        for o in OBJECTIVES:
            ratio_m = mem[o] / mem["none"] if mem["none"] > 0 else float("nan")
            print(f"{mode:6} {o:12} {1000 * t[o]:8.2f} {t[o] / t['none']:8.2f} {mem[o]:15.1f} {ratio_m:8.2f}")
        print(f"{mode:6} {HALVES:12} {1000 * t[HALVES]:8.2f} {t[HALVES] / t['none']:8.2f}   (reference)")


def extensions(suite: str, steps: int, rounds: int) -> dict[str, dict[str, Any]]:
    """{mode: {"step_seconds": {variant: median}, "step_seconds_rounds": {variant: [per round]}}} of every
    variant of ``EXTENSIONS``, LoRA and full fine-tuning."""
    from trap2.config import ObjectiveConfig

    out = {}
    for mode in ("lora", "full"):
        fns = {
            name: make_step(mode, ObjectiveConfig(**fields), BATCHES[suite][0], suite, protect)
            for name, fields, protect in EXTENSIONS
        }
        per = interleaved(fns, steps, rounds)
        out[mode] = {
            "step_seconds": {o: statistics.median(v) for o, v in per.items()},
            "step_seconds_rounds": per,
        }
    return out


def recipes(suite_name: str, steps: int, rounds: int) -> list[dict[str, Any]]:
    """One row per mode of the suite's bench recipe (``BenchConfig.train_config``; a mode without a
    recipe gets the defaults): the plain and the protected step at the recipe's batch and LoRA settings,
    interleaved, and the protected run's total compute in plain-step units."""
    from trap2.bench import MODES, BenchConfig
    from trap2.config import ObjectiveConfig, to_dict
    from trap2.suites import get_suite

    suite, bench = get_suite(suite_name), BenchConfig(suite=suite_name)
    rows = []
    for mode in MODES:
        cfg = bench.train_config(suite, mode)
        fns = {
            "plain": make_step(mode, ObjectiveConfig(name="none"), cfg.batch_size, suite_name, train=cfg),
            "protected": make_step(mode, cfg.objective, cfg.batch_size, suite_name, train=cfg),
        }
        per = interleaved(fns, steps, rounds)
        sec = {k: statistics.median(v) for k, v in per.items()}
        ratio = sec["protected"] / sec["plain"]
        rows.append(
            {
                "suite": suite_name,
                "mode": mode,
                "batch": cfg.batch_size,
                "objective": to_dict(cfg.objective),
                "plain_steps": cfg.steps,
                "protect_steps": cfg.run_steps,
                "step_seconds": sec,
                "step_seconds_rounds": per,
                "step_ratio": ratio,
                "protected_compute": cfg.run_steps * ratio,  # plain-step units
                "vs_plain_recipe": cfg.run_steps * ratio / cfg.steps,
            }
        )
    return rows


def recipe_table(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    rows = [r for name in args.recipe_suites.split(",") for r in recipes(name, args.steps, args.rounds)]
    body = {"steps": args.steps, "rounds": args.rounds, "rows": rows}
    header = f"{args.threads} thread(s); median of {args.rounds} interleaved rounds of {args.steps} steps"
    _emit("step-time-recipes", t0, body, header, args.out)


def _emit(kind: str, t0: float, body: dict[str, Any], header: str, out: Path | None) -> None:
    """Stamp ``body`` as a result of ``kind`` (provenance, wall time since ``t0``, this command), print
    ``header`` and its rendered tables, and write it to ``out`` when given."""
    from trap2.eval.report import provenance, render
    from trap2.io import write_json

    result = {
        **provenance(kind, time.perf_counter() - t0),
        "command": shlex.join(["python", "benchmarks/step_time.py", *sys.argv[1:]]),
        **body,
    }
    print(header)
    print(render(result), end="")
    if out is not None:
        write_json(out, result)


def extension_table(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    body = {
        "suite": args.suite,
        "batch": BATCHES[args.suite][0],
        "steps": args.steps,
        "rounds": args.rounds,
        "plain": EXTENSIONS[0][0],
        "variants": [
            {"variant": n, "objective": {"name": "trap2", **f}, "protect": p} for n, f, p in EXTENSIONS
        ],
        "modes": extensions(args.suite, args.steps, args.rounds),
    }
    header = (
        f"{args.suite} backbone, batch {body['batch']}, {args.threads} thread(s); "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    _emit("step-time-extensions", t0, body, header, args.out)


if __name__ == "__main__":
    main()
