"""``trap2 protect`` inside ``transformers.Trainer``: protect the adapter (or fine-tuned model) you give
it, by self-distillation on unlabelled inputs.

``Trap2ProtectTrainer(model=model_with_your_update, args=Trap2TrainingArguments(...), train_dataset=
unlabelled)``: the teacher is a frozen copy of the model as given (its update at s = 1, eval mode); the
student is the model itself. Per micro-batch, with t the teacher's logits (computed without gradient):

    J = T²·KL(softmax(t/T) ‖ softmax(f_1/T)) − λ·w(s)·b(CE(f_s, argmax t))

(:mod:`trap2.objectives.self_distill`; s, w, b and λ from the ``trap2_*`` arguments, s drawn per
optimizer step as in :class:`trap2.hf.Trap2Trainer`). The off-nominal passes are the Trainer's own
(:meth:`Trap2Mixin.trap2_off_nominal`), so what it takes this takes too: ``trap2_operators`` (each draw
W0 + op(ΔW) instead of W0 + s·ΔW; refused under FSDP / DeepSpeed), ``trap2_collateral`` and
``trap2_lookahead_steps`` (the attacker's loss is ``trap2_distill``'s: CE to the teacher off-nominal, plus
KL to the teacher at s = 1 for ``flatten``, on the off-nominal examples). Token logits (B, L, V) are
averaged over the batch's ``attention_mask``. Labels in the batch are ignored. The off-nominal backward
runs inside the scaled context, the nominal loss is returned, as in ``Trap2Mixin``. The teacher copy
costs one more model in memory (LoRA: the base weights too); ``teacher=`` takes a model you already hold
instead.

``off_fraction``, ``off_every`` and ``repair`` are ``trap2 protect``'s cost knobs (:class:`trap2.protect.
ProtectConfig`, validated by it with its messages), with its objective's step bookkeeping
(:meth:`SelfDistillObjective.traps`, ``trap_config``, ``off_size``) counted in optimizer steps (1-based, as
the built-in loop counts its steps; every micro-batch of an accumulated step alike): the off-nominal passes
see the batch's first round(B·off_fraction) examples (at least one), run on every ``off_every``-th step
only with λ·off_every, and not at all in the last ``repair`` fraction of the run's ``max_steps`` (the
teacher match alone). ``save_update`` records the protection settings (as ``trap2 protect`` records them)
and the teacher's fingerprint.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from trap2.hf.trainer import Trap2Mixin
from trap2.objectives.base import same_random_draws
from trap2.objectives.self_distill import SelfDistillObjective, distill_loss, teacher_ce
from trap2.protect import ProtectConfig, protect_settings, trap_steps
from trap2.updates import Update, tensors_fingerprint


def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out.logits


def _first(inputs: dict[str, Any], n: int, b: int) -> dict[str, Any]:
    """The batch's first ``n`` of its ``b`` examples: every tensor whose first dimension is the batch's."""
    return {
        k: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
        for k, v in inputs.items()
    }


class Trap2ProtectMixin(Trap2Mixin):
    """Mix in before a ``Trainer`` subclass; see the module docstring."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        temperature: float = 1.0,
        off_fraction: float = 1.0,
        off_every: int = 1,
        repair: float = 0.0,
        **kwargs: Any,
    ):
        # the protect phase's settings, checked as `trap2 protect` checks them, before anything is built
        self.trap2_protect = ProtectConfig(
            temperature=temperature, off_fraction=off_fraction, off_every=off_every, repair=repair
        )
        super().__init__(*args, **kwargs)
        self.trap2_config = dataclasses.replace(self.trap2_config, name="trap2_distill")
        self.trap2_temperature = float(temperature)
        # the built-in objective, for its step bookkeeping: which steps trap, on how much of the batch, with which λ
        self.trap2_schedule = SelfDistillObjective(
            self.trap2_config, "kl", self.trap2_temperature, off_fraction, off_every
        )
        self.loss_is_scaled_for_ga = False  # J is a per-batch mean: scaled for accumulation like any
        model = self.model
        self.trap2_teacher = teacher if teacher is not None else copy.deepcopy(model)
        self.trap2_teacher.eval().requires_grad_(False)
        given = self._trap2_update(model)
        self.trap2_teacher_record = {
            "fingerprint": tensors_fingerprint(given),
            "trainer": type(self).__name__,
        }

    def _trap2_update(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The update the model holds now: its LoRA branches (dense), or its trainable parameters − W0."""
        if self.trap2_mode == "lora":
            return Update.from_peft_model(model).dense()
        return {
            n: (p.detach() - self._trap2_scaled.w0[n]).float()
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # unlabelled: the teacher is the target
        mask = inputs.get("attention_mask")
        with torch.no_grad():
            teacher = _logits(self.trap2_teacher(**inputs)).detach()
        token_mask = mask if mask is not None and teacher.dim() == 3 else None
        schedule = self.trap2_schedule
        schedule.trap_steps = trap_steps(self.trap2_protect, self.state.max_steps)
        with same_random_draws(self.args.device) as replay:
            off_sum: torch.Tensor | float = 0.0
            if schedule.traps(self.state.global_step + 1):  # else a repair or in-between step: KL alone
                b = teacher.shape[0]
                n = schedule.off_size(b)
                off_in, off_t, off_mask = (
                    (inputs, teacher, token_mask)
                    if n == b
                    else (_first(inputs, n, b), teacher[:n], None if token_mask is None else token_mask[:n])
                )
                cfg = self.trap2_config
                self.trap2_config = schedule.trap_config(cfg)  # λ·off_every for this step's passes
                try:
                    # the Trainer's off-nominal loop (draws, operators, bound, collateral), CE to the teacher
                    inner = self.accelerator.unwrap_model(model)  # the lookahead's attacker: no DDP hooks
                    off_sum = self.trap2_off_nominal(
                        model,
                        lambda: teacher_ce(_logits(model(**off_in)), off_t, off_mask),
                        replay,
                        num_items_in_batch,
                        attacker_loss=lambda: teacher_ce(_logits(inner(**off_in)), off_t, off_mask),
                        attacker_nominal_loss=lambda: distill_loss(
                            _logits(inner(**off_in)), off_t, self.trap2_temperature, off_mask
                        ),
                    )
                finally:
                    self.trap2_config = cfg
            outputs = model(**inputs)
            nominal = distill_loss(_logits(outputs), teacher, self.trap2_temperature, token_mask)
        self._trap2_metrics["trap2_nominal_loss"].append(float(nominal.detach()))
        j = nominal + off_sum
        return (j, outputs) if return_outputs else j

    def save_update(
        self, path: Any, module: nn.Module | None = None, meta: dict[str, Any] | None = None, **kw: Any
    ):
        """``Trap2Mixin.save_update``, recording the protect phase and the teacher's fingerprint too."""
        info = {
            "protect": {**protect_settings(self.trap2_protect), "steps": self.state.max_steps},
            "teacher": self.trap2_teacher_record,
            **(meta or {}),
        }
        return super().save_update(path, module, info, **kw)


class Trap2ProtectTrainer(Trap2ProtectMixin, Trainer):
    """``transformers.Trainer`` that protects the update the model already holds (see the module docstring)."""
