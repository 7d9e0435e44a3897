"""The plain training loop: one task of a suite, LoRA or full fine-tuning, any registered objective.

The optimiser (AdamW), schedule (linear warm-up, cosine decay), gradient clipping and number of steps
come from ``TrainConfig`` alone, so protected and unprotected runs differ only in the objective.
A step whose objective or gradient norm is NaN/Inf is skipped (no optimizer update) and counted; too
many in a row stop training with :class:`TrainingError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trap2.config import TrainConfig, to_dict
from trap2.errors import ConfigError, TrainingError
from trap2.eval.evaluate import accuracy
from trap2.objectives import Objective, get_objective
from trap2.scaling import ScaledModel, base_params
from trap2.suites.base import Suite, Task, TaskModel
from trap2.training.checkpoint import load_checkpoint, prefixed, restore_optimizer, save_checkpoint
from trap2.updates import Update

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    update: Update
    val_acc: float  # standalone validation accuracy of the released update
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    skipped_steps: int = 0
    peft_model: Any = None  # the trained PeftModel (LoRA), for saving in PEFT's own format


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def wrap_lora(backbone: torch.nn.Module, suite: Suite, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules or suite.lora_targets),
        use_rslora=lc.use_rslora,
        rank_pattern=dict(lc.rank_pattern),
        alpha_pattern=dict(lc.alpha_pattern),
        bias="none",
    )
    try:
        return get_peft_model(backbone, peft_cfg)
    except ValueError as e:  # PEFT's message for targets that match nothing
        raise ConfigError(f"LoRA could not be applied: {str(e).splitlines()[0]}") from None


def trainable_backbone(suite: Suite, cfg: TrainConfig) -> torch.nn.Module:
    """A fresh backbone ready for ``cfg.mode``: LoRA-wrapped, or every parameter trainable apart from
    the suite's ``full_frozen`` ones (which stay at W0 and out of ΔW)."""
    backbone = suite.make_backbone()
    if cfg.mode == "lora":
        return wrap_lora(backbone, suite, cfg)
    for name, p in backbone.named_parameters():
        p.requires_grad_(not name.startswith(suite.full_frozen))  # startswith(()) is False
    return backbone


def start_from(backbone: torch.nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    params = dict(backbone.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ConfigError(f"init: {unknown[0]!r} is not a backbone parameter")
    with torch.no_grad():
        for n, d in delta.items():
            if tuple(d.shape) != tuple(params[n].shape):
                raise ConfigError(
                    f"init: {n} has shape {tuple(d.shape)}, the backbone {tuple(params[n].shape)}"
                )
            params[n].add_(d.to(params[n].dtype))


DIVERGENCE = 1e3  # an off-nominal loss above this is reported: the trap term is running away


@dataclass
class _Run:
    """One training run's state: what a step reads and writes, and what a checkpoint saves."""

    cfg: TrainConfig  # resolved
    task: Task
    objective: Objective
    device: torch.device
    model: TaskModel
    scaled: ScaledModel
    params: list[torch.nn.Parameter]  # the trainable ones, in model order
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    w0: dict[str, torch.Tensor] | None  # full mode: the trainable parameters' base values (W0)
    gen: torch.Generator  # data order: the same for every objective
    scale_gen: torch.Generator  # the objective's own draws (scales s)
    order: torch.Tensor  # this epoch's permutation of the training set
    cursor: int = 0  # position in ``order``
    start: int = 1  # first step to run (after a resume: the step after the checkpoint)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (val acc, step, trainable params)
    skipped: int = 0  # non-finite steps skipped so far
    in_a_row: int = 0  # ... of which the latest ones in a row
    stats_sum: dict[str, float] = field(default_factory=dict)  # step stats summed since the last eval
    n_sum: int = 0
    diverged_reported: bool = False

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def _setup(suite: Suite, task_name: str, cfg: TrainConfig, init: Mapping[str, torch.Tensor] | None) -> _Run:
    """Seed, build the model (LoRA-wrapped or trainable, task head frozen), optimiser and schedule."""
    task = suite.task(task_name)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    if init is not None and cfg.mode != "full":
        raise ConfigError("train_update(init=...) starts full fine-tuning from W0 + ΔW; use mode='full'")
    backbone = trainable_backbone(suite, cfg)
    w0 = None
    model = TaskModel(backbone, task.head_on(device)).to(device)
    if cfg.mode == "full":
        w0 = base_params(model)  # W0, kept once
        if init is not None:
            start_from(model.backbone, init)
    return _run_for(cfg, task, get_objective(cfg.objective), device, model, w0)


def _run_for(
    cfg: TrainConfig,
    task: Task,
    objective: Objective,
    device: torch.device,
    model: TaskModel,
    w0: dict[str, torch.Tensor] | None,
) -> _Run:
    """The run state around a built model: its trainable parameters, AdamW and the warm-up/cosine
    schedule, the seeded data order and scale generator (``_setup``'s, and ``trap2 protect``'s)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scale_gen = torch.Generator().manual_seed(cfg.seed + 1)
    scaled = ScaledModel(model, cfg.mode, w0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.peak_lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    order = torch.randperm(len(task.train.y), generator=gen)
    return _Run(cfg, task, objective, device, model, scaled, params, opt, sched, w0, gen, scale_gen, order)


def _resume_from(run: _Run, ckpt: Path | None) -> None:
    """Restore every piece of ``run``'s state from the checkpoint in ``ckpt``."""
    if ckpt is None or not ckpt.is_dir():
        raise ConfigError(f"nothing to resume: no checkpoint at {ckpt}")
    tensors, scalars = load_checkpoint(ckpt)
    loop = scalars["loop"]
    if loop["config"] != to_dict(run.cfg):
        raise ConfigError(f"{ckpt}: the checkpoint was made with a different configuration")
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param/{n}"])
    restore_optimizer(run.opt, tensors, scalars)
    run.sched.load_state_dict(scalars["sched"])
    rng = prefixed(tensors, "rng/")
    torch.set_rng_state(rng["torch"])
    run.gen.set_state(rng["data"])
    run.scale_gen.set_state(rng["scales"])
    run.order, run.cursor = tensors["loop/order"], loop["cursor"]
    run.skipped, run.in_a_row, run.n_sum = loop["skipped"], loop["in_a_row"], loop["n_sum"]
    run.stats_sum, run.history, run.start = loop["stats_sum"], loop["history"], loop["step"] + 1
    run.diverged_reported = loop["diverged_reported"]
    if loop["best"] is not None:
        run.best = (loop["best"][0], loop["best"][1], prefixed(tensors, "best/"))


def _save_checkpoint(run: _Run, ckpt: Path, step: int) -> None:
    """Save ``run``'s state after ``step`` (the folder is replaced atomically)."""
    loop = {
        "step": step,
        "cursor": run.cursor,
        "skipped": run.skipped,
        "in_a_row": run.in_a_row,
        "n_sum": run.n_sum,
        "stats_sum": run.stats_sum,
        "history": run.history,
        "diverged_reported": run.diverged_reported,
        "best": None if run.best is None else [run.best[0], run.best[1]],
        "config": to_dict(run.cfg),
    }
    best = {f"best/{k}": v for k, v in run.best[2].items()} if run.best else {}
    extra = {"order": run.order, **best}
    rngs = {"torch": torch.get_rng_state(), "data": run.gen.get_state(), "scales": run.scale_gen.get_state()}
    save_checkpoint(ckpt, dict(run.model.named_parameters()), run.opt, run.sched, rngs, loop, extra)


def _next_batch(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The next ``batch_size`` training samples in this epoch's order (a new order once it runs out)."""
    x_all, y_all = run.task.train.x, run.task.train.y
    if run.cursor + run.cfg.batch_size > len(run.order):
        run.order, run.cursor = torch.randperm(len(y_all), generator=run.gen), 0
    idx = run.order[run.cursor : run.cursor + run.cfg.batch_size]
    run.cursor += run.cfg.batch_size
    return x_all[idx].to(run.device), y_all[idx].to(run.device)


def _step(run: _Run, step: int) -> bool:
    """One optimiser step; False when the objective or gradient was non-finite and the step skipped."""
    cfg, objective, scaled, scale_gen = run.cfg, run.objective, run.scaled, run.scale_gen
    x, y = _next_batch(run)
    run.model.train()
    run.opt.zero_grad(set_to_none=True)
    st = objective.backward(scaled, x, y, run.task.loss, scale_gen)
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip else float("inf"))
    if not (math.isfinite(st.loss) and bool(torch.isfinite(norm))):
        run.skipped += 1
        run.in_a_row += 1
        run.opt.zero_grad(set_to_none=True)
        log.warning("step %d: non-finite objective or gradient, step skipped (%d so far)", step, run.skipped)
        if run.in_a_row >= cfg.max_nonfinite_in_row:
            raise TrainingError(
                f"{run.in_a_row} non-finite steps in a row at step {step}: lower lr or objective.lam, "
                "or set objective.bound"
            )
        run.sched.step()
        return False
    run.in_a_row = 0
    run.opt.step()
    run.sched.step()
    if st.off_nominal is not None and st.off_nominal > DIVERGENCE and not run.diverged_reported:
        run.diverged_reported = True
        log.warning(
            "step %d: off-nominal loss %.3g: the trap term is running away; set objective.bound "
            "(e.g. 50) or lower objective.lam",
            step,
            st.off_nominal,
        )
    row = {"loss": st.loss, "nominal": st.nominal, "grad_norm": float(norm)}
    if st.off_nominal is not None:
        row["off_nominal"] = st.off_nominal
    if st.disruption is not None:
        row["disruption"] = st.disruption
    for k, v in row.items():
        run.stats_sum[k] = run.stats_sum.get(k, 0.0) + v
    run.n_sum += 1
    return True


def _evaluate(run: _Run, step: int, progress: ProgressFn | None) -> None:
    """Validation accuracy and the mean step stats since the last evaluation: a history row; with
    ``select='best'`` the best parameters so far are kept."""
    val = accuracy(run.model.backbone, run.task, "val")
    entry = {
        "step": float(step),
        "val_acc": val,
        **{k: v / max(1, run.n_sum) for k, v in run.stats_sum.items()},
    }
    run.history.append(entry)
    run.stats_sum, run.n_sum = {}, 0
    if run.cfg.select == "best" and (run.best is None or val >= run.best[0]):
        run.best = (val, step, run.trainable_state())
    if progress:
        progress(step, entry)


def _release(run: _Run, suite: Suite, task_name: str) -> TrainResult:
    """The update to release (the best evaluated parameters with ``select='best'``, else the last),
    measured from W0, with its metadata."""
    cfg, model = run.cfg, run.model
    if cfg.select == "best" and run.best is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in run.best[2]:
                    p.copy_(run.best[2][n])
    val_acc = accuracy(model.backbone, run.task, "val")
    meta = {
        "suite": suite.name,
        "task": task_name,
        "mode": cfg.mode,
        "objective": to_dict(cfg.objective),
        "train": {k: v for k, v in to_dict(cfg).items() if k not in ("objective", "device")},
        "base_fingerprint": suite.fingerprint,
        "skipped_steps": run.skipped,
        "offnominal_diverged": run.diverged_reported,
        "val_acc": val_acc,
    }
    if cfg.mode == "lora":
        update = Update.from_peft_model(model.backbone, meta=meta)
        peft_model = model.backbone
    else:
        assert run.w0 is not None
        w0_backbone = {n.removeprefix("backbone."): t for n, t in run.w0.items()}
        now = {n: p for n, p in model.backbone.named_parameters()}
        update = Update.from_full(now, w0_backbone, meta=meta)
        peft_model = None
    return TrainResult(update, val_acc, run.history, run.skipped, peft_model)


def train_update(
    suite: Suite,
    task_name: str,
    cfg: TrainConfig,
    progress: ProgressFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Fine-tune the suite's backbone on one task with ``cfg.objective``; return the released update.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every`` the full training state is saved every that many
    steps; ``resume=True`` continues from the checkpoint found there (bit-identical to an uninterrupted
    run on CPU). ``init`` (full mode): a dense ΔW to start from, W = W0 + ΔW; the update returned is
    still measured from W0.
    """
    cfg = cfg.resolved()
    run = _setup(suite, task_name, cfg, init)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        _resume_from(run, ckpt)
    for step in range(run.start, cfg.steps + 1):
        if not _step(run, step):
            continue  # a skipped step is neither evaluated nor checkpointed
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _evaluate(run, step, progress)
        if (
            ckpt is not None
            and cfg.checkpoint_every
            and step % cfg.checkpoint_every == 0
            and step < cfg.steps
        ):
            _save_checkpoint(run, ckpt, step)
    return _release(run, suite, task_name)
