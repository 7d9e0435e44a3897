"""Trap² inside ``transformers.Trainer``: one import and one class name for a publisher's script.

``Trap2TrainingArguments`` adds the protection settings to ``TrainingArguments``; ``Trap2Mixin``
overrides ``compute_loss`` (the TRL pattern) so ``class MyTrainer(Trap2Mixin, SFTTrainer)`` works too;
``Trap2Trainer = Trap2Mixin + Trainer``.

Per micro-batch the mixin computes the off-nominal term first, at W0 + s·ΔW, and runs its backward
*inside* the scaled context (so activation checkpointing recomputes it at the same scale), then returns
the nominal loss, whose backward the Trainer runs as usual; the gradients add up to those of
J = L(W0+ΔW) − λ·w(s)·b(L(W0+s·ΔW)). Both passes see the same dropout masks. The scale s is drawn from
(seed, optimizer step): one s per optimizer step across the micro-batches of gradient accumulation (as
the paper's LLM code does), the same on every process, and the same after resuming.

With ``trap2_collateral = μ > 0`` the off-nominal term also carries μ·(1 − cos) between the features at
W0 + s·ΔW and at W0 (a third, gradient-free pass at s = 0 with the same dropout masks), as in the built-in
loop. The features (:func:`feature_module`) are the output of the model's ``backbone`` when it has one
(trap2's ``HeadedModel``: the head's input, as the loop reads it), else of a transformers model's
headless base model (``model.base_model``, e.g. ``BertModel`` in ``BertForSequenceClassification``,
``LlamaModel`` in ``LlamaForCausalLM``; a PEFT wrapper is looked through), whose first output is the last
hidden state (B, L, D); the cosine is taken over the last dimension and averaged over the rest.

With ``trap2_operators`` (hardening, docs/hardening.md) each off-nominal draw is an operator of the
family (per-layer scales, trims, spectral reweighting) applied to the update, drawn from the same
(seed, step) generator. With ``trap2_lookahead_steps = k > 0`` each draw's trap term is measured after
the attacker's k first-order steps on the micro-batch (``trap2.objectives.lookahead.lookahead``, the
built-in objective's): the trainable parameters are stepped in place, the trap pass and its backward run
there, and the parameters are copied back before the nominal pass. The attacker's passes go through the
unwrapped model (no DDP hooks; under DDP each process anticipates an attacker on its own micro-batch)
and its loss is the micro-batch mean (no ``num_items_in_batch``). Sharded training (FSDP, DeepSpeed) and
reentrant activation checkpointing (which ``torch.autograd.grad`` cannot go through) are refused with it.

Every ``ObjectiveConfig`` field is a ``trap2_<field>`` argument, generated from the config's fields
with their help text (``name`` is ``trap2_objective`` and ``lam`` is ``trap2_lambda``, whose ``None``
means the paper's per-mode default), so a knob added to the config reaches the Trainer by itself.

The model is protected in one of two modes, found from the model itself:
- ``lora``: the model holds PEFT LoRA layers; each layer's own ``scaling`` is multiplied by s.
- ``full``: every trainable parameter is the update; W0 is copied once when the Trainer is built and
  the scaled forward is applied per layer (:class:`trap2.scaling.FullScaler`), where FSDP/ZeRO-3 have
  gathered the parameter. FSDP needs ``use_orig_params=True``. W0 is one extra copy of the trainable
  parameters per process (not sharded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from trap2.config import ObjectiveConfig, to_dict
from trap2.errors import ConfigError, TrainingError
from trap2.objectives.base import same_random_draws
from trap2.objectives.lookahead import lookahead
from trap2.objectives.operators import Draw, draw_operators
from trap2.objectives.trap2 import bounded, disruption, feature_tap, scale_weight
from trap2.scaling import ScaledModel, base_params, lora_layers
from trap2.training.loop import DIVERGENCE
from trap2.updates import Update

log = logging.getLogger(__name__)

TRAINER_OBJECTIVES = ("none", "trap2")
DEFAULT_LAMBDA = {"lora": 1e-3, "full": 5e-3}  # the paper's values; λ depends on the loss scale
_RENAMED = {"name": "trap2_objective", "lam": "trap2_lambda"}  # the names publishers already use
# ObjectiveConfig field -> Trap2TrainingArguments argument, for every field of the config
OBJECTIVE_ARGS = {
    f.name: _RENAMED.get(f.name, f"trap2_{f.name}") for f in dataclasses.fields(ObjectiveConfig)
}


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


def _objective_argument_fields() -> list[tuple[str, Any, Any]]:
    """(argument, type, field) for every ObjectiveConfig field: its type, default and help text."""
    hints = get_type_hints(ObjectiveConfig)
    out = []
    for f in dataclasses.fields(ObjectiveConfig):
        tp, text = hints[f.name], f.metadata["help"]
        default: Any = f.default
        if f.name == "lam":  # None: the paper's value for the mode the model is trained in
            tp, default = float | None, None
            text += (
                f"; None = the paper's {DEFAULT_LAMBDA['lora']:g} (LoRA) or {DEFAULT_LAMBDA['full']:g} (full)"
            )
        if default is dataclasses.MISSING:
            spec = field(default_factory=f.default_factory, metadata={"help": text})
        else:
            spec = _help(text, default)
        out.append((OBJECTIVE_ARGS[f.name], tp, spec))
    return out


_ObjectiveArguments = dataclasses.make_dataclass("_ObjectiveArguments", _objective_argument_fields())
_ObjectiveArguments.__module__ = __name__
_ObjectiveArguments.__doc__ = "The ``trap2_*`` arguments, one per ObjectiveConfig field (generated)."


@dataclass
class Trap2TrainingArguments(_ObjectiveArguments, TrainingArguments):
    """``TrainingArguments`` plus the Trap² settings (``HfArgumentParser`` exposes them as flags): one
    ``trap2_<field>`` per :class:`ObjectiveConfig` field (see :data:`OBJECTIVE_ARGS`), and the two below."""

    trap2_seed: int | None = _help("seed of the sampled scales; None = the run's seed", None)
    trap2_max_nonfinite_in_row: int = _help(
        "non-finite steps (skipped, no update) tolerated in a row before training stops", 20
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trap2_objective not in TRAINER_OBJECTIVES:
            raise ConfigError(
                f"trap2_objective={self.trap2_objective!r}: the Trainer supports {', '.join(TRAINER_OBJECTIVES)}"
                " (the one-pass trap2_split needs per-sample losses; use the built-in loop)"
            )
        if self.trap2_max_nonfinite_in_row < 1:
            raise ConfigError("trap2_max_nonfinite_in_row must be ≥ 1")
        self.objective_config("lora")  # validates the ranges now, not at the first step

    def objective_config(self, mode: str) -> ObjectiveConfig:
        """The settings as the library's validated :class:`ObjectiveConfig` for ``mode``."""
        values = {name: getattr(self, arg) for name, arg in OBJECTIVE_ARGS.items()}
        if values["lam"] is None:
            values["lam"] = DEFAULT_LAMBDA[mode]
        return ObjectiveConfig(**values)

    @staticmethod
    def objective_arguments(cfg: ObjectiveConfig) -> dict[str, Any]:
        """The ``trap2_*`` keyword arguments that reproduce ``cfg``."""
        return {arg: getattr(cfg, name) for name, arg in OBJECTIVE_ARGS.items()}


def feature_module(model: nn.Module) -> nn.Module:
    """The module whose output the collateral term compares (see the module docstring): the model's
    ``backbone``, else a transformers model's headless ``base_model`` (through a PEFT wrapper), else the
    model itself."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone
    if hasattr(model, "get_base_model"):  # PeftModel -> the transformers model it adapts
        model = model.get_base_model()
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _reentrant_checkpointing(targs: TrainingArguments) -> bool:
    """Whether the run checkpoints activations with the reentrant variant (transformers 4 defaults to it,
    5 to the non-reentrant one)."""
    if not getattr(targs, "gradient_checkpointing", False):
        return False
    kwargs = getattr(targs, "gradient_checkpointing_kwargs", None) or {}
    if "use_reentrant" in kwargs:
        return bool(kwargs["use_reentrant"])
    return int(transformers.__version__.split(".")[0]) < 5


class _NonFiniteGuard(TrainerCallback):
    def __init__(self, trainer: Trap2Mixin) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._trap2_guard_step()


class Trap2Mixin:
    """Mix in before a ``Trainer`` subclass: ``class MyTrainer(Trap2Mixin, SFTTrainer)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        if not isinstance(targs, Trap2TrainingArguments):
            raise ConfigError(
                f"{type(self).__name__} needs Trap2TrainingArguments (got {type(targs).__name__}): they carry "
                "the protection settings"
            )
        model = self.model
        self.trap2_mode = "lora" if lora_layers(model) else "full"
        w0 = base_params(model) if self.trap2_mode == "full" else None  # W0, kept once
        if w0 == {}:
            raise ConfigError("the model has no trainable parameters and no LoRA layers: nothing to protect")
        # the library's scaled model: LoRA checks and scaling, or full fine-tuning's per-layer scaler
        self._trap2_scaled = ScaledModel(model, self.trap2_mode, w0)
        self.trap2_config = targs.objective_config(self.trap2_mode)
        if self.trap2_config.balance is not None:
            raise ConfigError(
                "trap2_balance is implemented by the built-in loop only (trap2 train / bench): it needs the "
                "nominal and trap gradients of the whole optimizer step apart before clipping"
            )
        sharded = self.accelerator.distributed_type in ("FSDP", "DEEPSPEED")
        if self.trap2_config.operators != "scale" and sharded:
            raise ConfigError(
                "trap2_operators other than 'scale' read each unit's whole ΔW to draw and check an operator; "
                "under FSDP / DeepSpeed the parameters are sharded: train single-process or with DDP"
            )
        if self.trap2_config.lookahead_steps and sharded:
            raise ConfigError(
                "trap2_lookahead_steps: the attacker's steps move every trainable parameter in place; under "
                "FSDP / DeepSpeed the parameters are sharded: train single-process or with DDP"
            )
        if self.trap2_config.lookahead_steps and _reentrant_checkpointing(targs):
            raise ConfigError(
                "trap2_lookahead_steps: the attacker's steps take torch.autograd.grad, which reentrant "
                "activation checkpointing does not support; set gradient_checkpointing_kwargs="
                "{'use_reentrant': False}"
            )
        self._trap2_features = feature_module(model)  # read only with trap2_collateral > 0
        self._trap2_seed = targs.seed if targs.trap2_seed is None else targs.trap2_seed
        self._trap2_metrics: dict[str, list[float]] = defaultdict(list)
        self.trap2_skipped_steps = 0
        self._trap2_in_a_row = 0
        self._trap2_diverged = False
        self.add_callback(_NonFiniteGuard(self))

    # --- the objective ------------------------------------------------------------------------------

    def trap2_draws(self, step: int | None = None) -> list[Draw]:
        """The off-nominal operators for optimizer step ``step`` (default: the current one); with the
        paper's family (``scale``) the same on every process, and the same after resuming."""
        step = self.state.global_step if step is None else step
        gen = torch.Generator().manual_seed(self._trap2_seed * 1_000_003 + step)
        return draw_operators(self.trap2_config, self._trap2_scaled, self.trap2_config.n_samples, gen)

    def trap2_scales(self, step: int | None = None) -> list[float]:
        """The scales s for optimizer step ``step`` (default: the current one): the paper's family only
        (an operator draw is not a scale; :meth:`trap2_draws` gives those)."""
        if self.trap2_config.operators != "scale":
            raise ConfigError(
                f"trap2_operators={self.trap2_config.operators!r} draws operators: use trap2_draws()"
            )
        return [d.s for d in self.trap2_draws(step)]

    def trap2_scaled(self, model: nn.Module, s: float | Draw) -> Any:
        """Context in which ``model`` (the trainer's model, or a DDP/FSDP wrapper of it: they share the
        layers that are scaled) computes with W0 + s·ΔW, or with W0 + op(ΔW) for an operator draw."""
        if isinstance(s, Draw):
            if s.transforms is not None:
                return self._trap2_scaled.transformed(s.transforms)
            s = s.s
        return self._trap2_scaled.scale(s)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        cfg = self.trap2_config
        if cfg.name == "none" or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inner = self.accelerator.unwrap_model(model)
        with same_random_draws(self.args.device) as replay:
            off_sum = self.trap2_off_nominal(
                model,
                lambda: super(Trap2Mixin, self).compute_loss(
                    model, dict(inputs), num_items_in_batch=num_items_in_batch
                ),
                replay,
                num_items_in_batch,
                # the lookahead's attacker: the micro-batch mean, off-nominal and (flatten) at s = 1
                attacker_loss=lambda: super(Trap2Mixin, self).compute_loss(inner, dict(inputs)),
            )
            # outputs only when asked: TRL's SFTTrainer recomputes the logits for them with another forward
            nominal = super().compute_loss(
                model, dict(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            loss, outputs = nominal if return_outputs else (nominal, None)
        self._trap2_metrics["trap2_nominal_loss"].append(float(loss.detach()))
        j = loss + off_sum  # the value of J; only the nominal part still needs its backward
        return (j, outputs) if return_outputs else j

    def trap2_off_nominal(
        self,
        model: nn.Module,
        off_loss: Callable[[], torch.Tensor],
        replay: Callable[[], None],
        num_items_in_batch: Any = None,
        *,
        attacker_loss: Callable[[], torch.Tensor] | None = None,
        attacker_nominal_loss: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor | float:
        """The off-nominal part of J for this micro-batch, its backward run: for each of the step's draws
        (:meth:`trap2_draws`: s·ΔW, or an operator of ``trap2_operators``), ``off_loss()`` (one forward of
        ``model`` on the batch, returning L) inside the draw's context, the term −λ·w(s)·b(L) [+ μ·(1 − cos)
        to the features at W0] / n backpropagated there. ``replay`` (from ``same_random_draws``) is called
        after each pass, so the caller's nominal pass that follows sees the same dropout masks. Returns the
        sum of the terms (detached) and records the step's metrics. Shared by every Trap² Trainer
        (``Trap2Mixin``: the task's loss; ``Trap2ProtectMixin``: CE against the teacher).

        With ``trap2_lookahead_steps`` the term of each draw is taken after the attacker's steps
        (:func:`trap2.objectives.lookahead.lookahead`), whose loss is ``attacker_loss()`` inside the draw's
        context, plus ``attacker_nominal_loss()`` (default ``attacker_loss``) at s = 1 for the ``flatten``
        attacker; ``attacker_loss`` defaults to ``off_loss``."""
        cfg = self.trap2_config
        draws = self.trap2_draws()
        params = [p for p in self.model.parameters() if p.requires_grad] if cfg.lookahead_steps else []
        attacker_loss = off_loss if attacker_loss is None else attacker_loss
        attacker_nominal_loss = attacker_loss if attacker_nominal_loss is None else attacker_nominal_loss
        off_sum: torch.Tensor | float = 0.0
        offs, disrupted = [], []
        # feature_tap reads `.model`: point it at the module whose output is the features
        features = types.SimpleNamespace(model=self._trap2_features)
        tap = feature_tap(features) if cfg.collateral else contextlib.nullcontext()
        with tap as seen:
            if cfg.collateral:  # the features at W0 (s = 0), no gradient
                with torch.no_grad(), self.trap2_scaled(model, 0.0):
                    off_loss()
                base = seen[-1].detach()
                seen.clear()
                replay()
            for d in draws:
                at_draw = functools.partial(self.trap2_scaled, model, d.s if d.transforms is None else d)
                attack = lookahead(cfg, params, attacker_loss, attacker_nominal_loss, replay, at_draw)
                with attack, at_draw():
                    if cfg.lookahead_steps:
                        replay()  # the attacker's passes drew masks: the trap pass sees the batch's again
                        if cfg.collateral:
                            seen.clear()  # the attacker's passes' features
                    off = off_loss()
                    trap = bounded(off, cfg.bound)
                    if cfg.collateral:
                        dis = disruption(seen[-1], base)
                        trap = trap + cfg.collateral * dis
                        disrupted.append(float(dis.detach()))
                        seen.clear()
                    term = -(cfg.lam * scale_weight(cfg.weight, d.s) / len(draws)) * trap
                    self._trap2_backward(term, num_items_in_batch)
                off_sum = off_sum + term.detach()
                offs.append(float(off.detach()))
                replay()
        m = self._trap2_metrics
        m["trap2_off_nominal_loss"].append(sum(offs) / len(offs))
        m["trap2_scale"].append(sum(d.s for d in draws) / len(draws))
        if disrupted:
            m["trap2_disruption"].append(sum(disrupted) / len(disrupted))
        if max(offs) > DIVERGENCE and not self._trap2_diverged:
            self._trap2_diverged = True
            log.warning(
                "step %d: off-nominal loss %.3g: the trap term is running away; set trap2_bound (e.g. 50) "
                "or lower trap2_lambda",
                self.state.global_step,
                max(offs),
            )
        return off_sum

    def _trap2_backward(self, term: torch.Tensor, num_items_in_batch: Any) -> None:
        """Backward of the off-nominal term with the loss normalisation ``training_step`` applies."""
        if self.args.n_gpu > 1:
            term = term.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            term = term / getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
        kwargs = {}
        if self.accelerator.distributed_type == "DEEPSPEED":
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(term, **kwargs)

    # --- non-finite steps ---------------------------------------------------------------------------

    def _trap2_guard_step(self) -> None:
        """Before the optimizer step: a non-finite gradient skips the update (all processes agree)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bad = torch.zeros((), device=self.args.device)
        if grads:
            bad = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().to(self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bool(bad):
            self._trap2_in_a_row = 0
            return
        self.trap2_skipped_steps += 1
        self._trap2_in_a_row += 1
        if getattr(self.accelerator, "scaler", None) is None:  # fp16's GradScaler skips the step itself
            for p in self.model.parameters():
                p.grad = None  # AdamW leaves parameters without a gradient untouched
        log.warning(
            "step %d: non-finite gradient, step skipped (%d so far)",
            self.state.global_step,
            self.trap2_skipped_steps,
        )
        if self._trap2_in_a_row >= self.args.trap2_max_nonfinite_in_row:
            raise TrainingError(
                f"{self._trap2_in_a_row} non-finite steps in a row at step {self.state.global_step}: lower the "
                "learning rate or trap2_lambda, or set trap2_bound"
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: add what the objective saw since the last one
            for k, v in self._trap2_metrics.items():
                logs[k] = round(sum(v) / len(v), 6)
            self._trap2_metrics.clear()
            logs["trap2_skipped_steps"] = self.trap2_skipped_steps
        super().log(logs, *args, **kwargs)

    # --- release ------------------------------------------------------------------------------------

    def save_update(
        self,
        path: str | Path,
        module: nn.Module | None = None,
        meta: dict[str, Any] | None = None,
        *,
        task: str | None = None,
        base_fingerprint: str | None = None,
    ) -> Path:
        """Write the trained update in trap2's release format (atomic), with the protection settings, the
        task it was trained for and the fingerprint of its base, so that ``trap2 audit`` needs no
        ``--task`` and refuses it on another base.

        ``module``: the part of the model whose parameter names the update uses (default: the model the
        Trainer was given; pass the backbone when a wrapper adds a frozen head around it).
        ``base_fingerprint``: default :func:`base_fingerprint_of` the model (its folder's weights file when
        it was loaded from a local folder or the Hugging Face cache, else its W0 tensors).
        """
        model = self.accelerator.unwrap_model(self.model)
        module = model if module is None else module
        prefix = {id(m): n for n, m in model.named_modules()}.get(id(module))
        if prefix is None:
            raise ConfigError("save_update: `module` is not part of the trained model")
        cut = f"{prefix}." if prefix else ""
        full_w0 = self._trap2_scaled.w0 if self.trap2_mode == "full" else None
        w0 = {n[len(cut) :]: t for n, t in (full_w0 or {}).items() if n.startswith(cut)}
        info = {
            "mode": self.trap2_mode,
            "objective": to_dict(self.trap2_config),
            "trainer": type(self).__name__,
            "global_step": self.state.global_step,
            "skipped_steps": self.trap2_skipped_steps,
            **(meta or {}),
        }
        if task is not None:
            info["task"] = task
        if base_fingerprint is None and "base_fingerprint" not in info:
            base_fingerprint = base_fingerprint_of(model, module, w0)
        if base_fingerprint is not None:
            info["base_fingerprint"] = base_fingerprint
        if self.trap2_mode == "lora":
            update = Update.from_peft_model(module, meta=info)
            return update.save(path, peft_model=module if hasattr(module, "peft_config") else None)
        now = dict(module.named_parameters())
        return Update.from_full(now, w0, meta=info).save(path)


def _source_folder(model: nn.Module) -> Path | None:
    """The local folder a transformers model was loaded from (a path, or a repo id in the local
    Hugging Face cache; nothing is downloaded), if it holds safetensors weights."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "")
    if not name:
        return None
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name), local_files_only=True))
        except Exception:  # not a repo id, or not cached: no folder to fingerprint
            return None
    return folder if any(folder.glob("*.safetensors")) else None


def base_fingerprint_of(
    model: nn.Module, module: nn.Module | None = None, w0: dict[str, torch.Tensor] | None = None
) -> str:
    """The fingerprint of the base a model was trained from: its folder's weights file as the suites
    record it (``trap2.data.prepare.weights_fingerprint``) when it was loaded from a local folder, else
    :func:`trap2.updates.tensors_fingerprint` of ``module``'s W0 (LoRA: its base layers' weights, named as
    the base model names them; full: ``w0`` over its current values)."""
    from trap2.data.prepare import weights_fingerprint as folder_fingerprint
    from trap2.updates import PEFT_PREFIX, tensors_fingerprint

    module = model if module is None else module
    # the released part first: a wrapper (a pooling or head module around the PEFT model) has no folder
    folder = _source_folder(module) or _source_folder(model)
    if folder is not None:
        return folder_fingerprint(folder)
    state = {}
    for name, p in module.named_parameters():
        if ".lora_" in name:
            continue
        state[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = p
    state.update(w0 or {})
    return tensors_fingerprint(state)


class Trap2Trainer(Trap2Mixin, Trainer):
    """``transformers.Trainer`` that trains a Trap²-protected update (see the module docstring)."""
