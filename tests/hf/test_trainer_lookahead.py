"""The lookahead in the Trainers (trap2_lookahead_steps): each trap term is taken after the attacker's
first-order steps on the micro-batch, as the built-in objective takes it. Checked against the built-in
Trap2Objective / SelfDistillObjective on the same batch and draws, against a hand-written computation on a
tiny random BERT (dropout on: every pass sees the same masks), with the Trainer's token normalisation and
with activation checkpointing; with no lookahead, bit for bit against the off-nominal loop before it."""

import contextlib
import copy
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_trainer import (
    Logits,
    args,
    digits_model,
    move_off_w0,
    step_gradients,
    tiny_bert_classifier,
    train_recording,
)

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.hf import Trap2ProtectTrainer, Trap2Trainer, Trap2TrainingArguments
from trap2.hf.models import task_examples
from trap2.objectives.self_distill import SelfDistillObjective
from trap2.objectives.trap2 import bounded, disruption, feature_tap, scale_weight
from trap2.scaling import ScaledModel

RECOVER = ObjectiveConfig(lam=0.1, lookahead_steps=2, lookahead_lr=0.01)  # AdamW's first two steps
FLATTEN = ObjectiveConfig(
    lam=0.1, lookahead_steps=1, lookahead_lr=0.05, lookahead_objective="flatten", lookahead_update="sgd"
)
HARDENED = ObjectiveConfig(
    lam=0.1,
    operators="layer_scale,trim,spectral",
    n_samples=2,
    collateral=0.2,
    lookahead_steps=1,
    lookahead_lr=0.01,
    lookahead_objective="flatten",
)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def digits_batch(tmp_path, digits, model):
    probe = Trap2Trainer(model=model, args=args(tmp_path), train_dataset=task_examples(digits.task("rot90")))
    return probe.data_collator(task_examples(digits.task("rot90"))[:16])


@pytest.mark.parametrize(
    "cfg", [RECOVER, FLATTEN, HARDENED], ids=["recover-adam", "flatten-sgd", "operators"]
)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_gradient_with_lookahead_equals_the_library_objective(tmp_path, digits, mode, cfg):
    """One Trainer micro-step with the lookahead accumulates the gradient of the built-in Trap2Objective
    with the same config, batch and draws (the attacker's steps included), and the lookahead matters: the
    gradient without it is another one."""
    model = digits_model(digits, mode)
    batch = digits_batch(tmp_path, digits, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, stats = step_gradients(
        tmp_path, model, batch, "pixel_values", lambda m: Logits(m, m.backbone, "pixel_values"), cfg
    )
    if mode == "lora":  # the attacker's steps are undone exactly (full fine-tuning was moved off W0)
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert trainer._trap2_metrics["trap2_off_nominal_loss"] == [pytest.approx(stats.off_nominal, rel=1e-5)]
    with_lookahead = grads(model)

    plain = digits_model(digits, mode)
    step_gradients(
        tmp_path,
        plain,
        batch,
        "pixel_values",
        lambda m: Logits(m, m.backbone, "pixel_values"),
        dataclasses.replace(cfg, lookahead_steps=0),
    )
    without = grads(plain)
    gap = max(float((with_lookahead[n] - without[n]).abs().max()) for n in without)
    scale = max(float(g.abs().max()) for g in without.values())
    assert gap > 1e-3 * scale, (gap, scale)


def by_hand(model, mode, w0, batch, cfg, s, rng):
    """J and its gradient for one draw s, written out: θ_{i+1} = θ_i − η·g_i (SGD), g_i = ∇L_att(θ_i) with
    L_att = L(s) [+ L(1) for flatten], then ∇L(1)(θ) − λ·w(s)·∇L(s)(θ_k); the parameters are put back.
    Every pass starts from the RNG state ``rng`` (the same dropout masks)."""
    ref = copy.deepcopy(model)
    scaled = ScaledModel(ref, mode, w0)
    params = [p for p in ref.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]

    def loss(at):
        torch.set_rng_state(rng)
        with scaled.scale(at):
            return ref(**batch).loss

    for _ in range(cfg.lookahead_steps):
        attacker = loss(s) + (loss(1.0) if cfg.lookahead_objective == "flatten" else 0.0)
        g = torch.autograd.grad(attacker, params)
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.sub_(cfg.lookahead_lr * gi)
    trap = -cfg.lam / s * loss(s)
    g_trap = torch.autograd.grad(trap, params)
    with torch.no_grad():
        for p, t in zip(params, theta, strict=True):
            p.copy_(t)
    nominal = loss(1.0)
    g_nom = torch.autograd.grad(nominal, params)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    return float((nominal + trap).detach()), {n: a + b for n, a, b in zip(names, g_nom, g_trap, strict=True)}


@pytest.mark.parametrize("attacker", ["recover", "flatten"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_lookahead_equals_a_hand_written_first_order_step(tmp_path, mode, attacker):
    """A transformers model (tiny BERT, the Trainer's own compute_loss): J and the gradient of one micro-step
    equal the attacker's SGD steps and the trap term at the attacked point, written out by hand."""
    model, batch = tiny_bert_classifier(mode, dropout=0.1)
    reference = copy.deepcopy(model)
    cfg = ObjectiveConfig(
        lam=0.2, lookahead_steps=2, lookahead_lr=0.5, lookahead_objective=attacker, lookahead_update="sgd"
    )
    trainer = Trap2Trainer(
        model=model,
        args=args(tmp_path, seed=2, **Trap2TrainingArguments.objective_arguments(cfg)),
        train_dataset=[batch],
    )
    w0 = trainer._trap2_scaled.w0
    if mode == "full":  # W ≠ W0, so that the scaled models differ
        move_off_w0(model, reference)
    (s,) = trainer.trap2_scales(0)
    rng = torch.get_rng_state()
    reference.train()
    want_j, want = by_hand(reference, mode, w0, batch, cfg, s, rng)
    _, plain = by_hand(reference, mode, w0, batch, dataclasses.replace(cfg, lookahead_steps=0), s, rng)
    torch.set_rng_state(rng)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    j = trainer.compute_loss(model, dict(batch))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # put back
    j.backward()
    assert float(j) == pytest.approx(want_j, rel=1e-5)
    got = grads(model)
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    gap = max(float((want[n] - plain[n]).abs().max()) for n in want)  # the steps moved the trap
    assert gap > 1e-2 * max(float(g.abs().max()) for g in plain.values())


def test_protect_trainer_lookahead_equals_the_library_objective(tmp_path, digits):
    """Trap2ProtectTrainer with the lookahead (flatten: CE to the teacher off-nominal + KL to it at s = 1) on
    the first half of the batch (off_fraction): the gradient of trap2_distill with the same settings."""
    model = digits_model(digits, "lora")
    reference = copy.deepcopy(model)
    examples = task_examples(digits.task("rot90"))[:16]
    cfg = dataclasses.replace(FLATTEN, lam=0.3, lookahead_steps=2)
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, seed=3, **Trap2TrainingArguments.objective_arguments(cfg)),
        train_dataset=examples,
        off_fraction=0.5,
    )
    batch = trainer.data_collator(examples)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)

    view = Logits(reference, reference.backbone, "pixel_values")
    with torch.no_grad():
        teacher = view(batch["pixel_values"])
    reference.train()

    def library(lookahead_steps):
        reference.zero_grad()
        objective = SelfDistillObjective(
            dataclasses.replace(cfg, name="trap2_distill", lookahead_steps=lookahead_steps), off_fraction=0.5
        )
        gen = torch.Generator().manual_seed(3 * 1_000_003)
        stats = objective.backward(
            ScaledModel(view, "lora"), batch["pixel_values"], teacher, F.cross_entropy, gen
        )
        return stats, grads(reference)

    stats, want = library(2)
    assert stats.scales == trainer.trap2_scales(0)
    got = grads(model)
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert trainer._trap2_metrics["trap2_off_nominal_loss"] == [pytest.approx(stats.off_nominal, rel=1e-5)]
    _, plain = library(0)
    assert max(float((want[n] - plain[n]).abs().max()) for n in want) > 1e-4


def test_the_attacker_loss_is_the_micro_batch_mean(tmp_path):
    """A tiny random Llama takes num_items_in_batch (under gradient accumulation, the label tokens of the
    whole optimizer step): the trap and nominal terms are sums over those, but the attacker's steps use
    the micro-batch mean, so J and its gradient with 4n items are a quarter of those with the n the
    micro-batch has (an attacker scaled by 1/4 would step elsewhere: SGD is not scale-free)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=16,
        )
    )  # fmt: skip
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    ids = torch.randint(0, 40, (4, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    batch = {"input_ids": ids, "labels": labels}
    n = int((labels[:, 1:] != -100).sum())  # the tokens the shifted loss counts
    trainer = Trap2Trainer(
        model=model,
        args=args(tmp_path, trap2_lookahead_steps=2, trap2_lookahead_lr=2.0, trap2_lookahead_update="sgd"),
        train_dataset=[batch],
    )
    assert trainer.model_accepts_loss_kwargs
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    out = []
    for items in (n, 4 * n):
        model.zero_grad()
        j = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(items))
        j.backward()
        out.append((float(j.detach()), grads(model)))
    (j_n, g_n), (j_4n, g_4n) = out
    assert j_4n == pytest.approx(j_n / 4, rel=1e-5)
    for k in g_n:
        torch.testing.assert_close(g_4n[k], g_n[k] / 4, rtol=1e-4, atol=1e-8, msg=k)
    with_lookahead = j_n
    trainer.trap2_config = dataclasses.replace(trainer.trap2_config, lookahead_steps=0)
    assert float(trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)).detach()) != (
        pytest.approx(with_lookahead, rel=1e-3)
    )


# --- no lookahead: bit for bit the loop before it ------------------------------------------------------


class _OffNominalBefore:
    """Trap2Mixin.trap2_off_nominal before the lookahead (main at 4739719), as a reference."""

    def trap2_off_nominal(self, model, off_loss, replay, num_items_in_batch=None, **_attacker):
        cfg = self.trap2_config
        draws = self.trap2_draws()
        off_sum = 0.0
        offs, disrupted = [], []
        features = types.SimpleNamespace(model=self._trap2_features)
        tap = feature_tap(features) if cfg.collateral else contextlib.nullcontext()
        with tap as seen:
            if cfg.collateral:
                with torch.no_grad(), self.trap2_scaled(model, 0.0):
                    off_loss()
                base = seen[-1].detach()
                seen.clear()
                replay()
            for d in draws:
                with self.trap2_scaled(model, d.s if d.transforms is None else d):
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
        return off_sum


class _TrainerBefore(_OffNominalBefore, Trap2Trainer):
    pass


class _ProtectBefore(_OffNominalBefore, Trap2ProtectTrainer):
    pass


@pytest.mark.parametrize(
    ("before", "now"), [(_TrainerBefore, Trap2Trainer), (_ProtectBefore, Trap2ProtectTrainer)]
)
def test_no_lookahead_is_bit_identical_to_before(tmp_path, digits, monkeypatch, before, now):
    """trap2_lookahead_steps = 0 (given explicitly), with operators and collateral: three training steps
    give exactly the losses and the weights of the off-nominal loop before the lookahead."""
    runs = []
    for cls in (before, now):
        model = digits_model(digits, "lora")
        trainer = cls(
            model=model,
            args=args(
                tmp_path,
                max_steps=3,
                trap2_lambda=0.3,
                trap2_collateral=0.2,
                trap2_operators="scale,trim",
                trap2_lookahead_steps=0,
                learning_rate=2e-3,
            ),
            train_dataset=task_examples(digits.task("rot90")),
        )
        runs.append(train_recording(trainer, monkeypatch))
    (l_before, w_before), (l_now, w_now) = runs
    assert len(l_before) == len(l_now) == 3
    assert all(torch.equal(a, b) for a, b in zip(l_before, l_now, strict=True)), (l_before, l_now)
    assert w_before.keys() == w_now.keys()
    assert all(torch.equal(w_before[n], w_now[n]) for n in w_before)


# --- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(lookahead_steps=-1),
        dict(lookahead_steps=1.5),
        dict(lookahead_steps=True),
        dict(lookahead_lr=0.0),
        dict(lookahead_lr=float("nan")),
        dict(lookahead_objective="distill"),
        dict(lookahead_update="rmsprop"),
    ],
)
def test_bad_lookahead_values_give_the_built_in_messages(tmp_path, bad):
    """The same one-line ConfigError as the built-in config, when the arguments are made; nothing written."""
    with pytest.raises(ConfigError) as want:
        ObjectiveConfig(**bad)
    with pytest.raises(ConfigError) as got:
        args(tmp_path / "out", **{f"trap2_{k}": v for k, v in bad.items()})
    assert str(got.value) == str(want.value)
    assert "\n" not in str(got.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cls", [Trap2Trainer, Trap2ProtectTrainer])
def test_reentrant_checkpointing_is_refused_with_the_lookahead(tmp_path, digits, cls):
    """torch.autograd.grad (the attacker's steps) cannot go through reentrant activation checkpointing."""
    checkpointed = dict(gradient_checkpointing=True, trap2_lookahead_steps=1)
    with pytest.raises(ConfigError, match="^trap2_lookahead_steps: .*use_reentrant': False"):
        cls(
            model=digits_model(digits, "lora"),
            args=args(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": True}, **checkpointed),
        )
    # accepted: non-reentrant checkpointing with the lookahead, reentrant without it
    cls(
        model=digits_model(digits, "lora"),
        args=args(tmp_path, gradient_checkpointing_kwargs={"use_reentrant": False}, **checkpointed),
    )
    cls(
        model=digits_model(digits, "lora"),
        args=args(
            tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
        ),
    )


def test_non_reentrant_checkpointing_gives_the_same_lookahead_gradient(tmp_path):
    """Tiny BERT (full fine-tuning) with non-reentrant activation checkpointing: the lookahead step's
    gradient is the one without checkpointing (each layer's forward then runs again in each backward)."""
    cfg = dict(trap2_lambda=0.2, trap2_lookahead_steps=1, trap2_lookahead_lr=0.1)
    results, forwards = [], []
    for checkpointing in (False, True):
        model, batch = tiny_bert_classifier("full")
        kw = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = Trap2Trainer(
            model=model,
            args=args(tmp_path, seed=1, **cfg, **(kw if checkpointing else {})),
            train_dataset=[batch],
        )
        move_off_w0(model, copy.deepcopy(model))
        if checkpointing:  # as train() does
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []  # forwards of a module inside a checkpointed layer
        model.bert.encoder.layer[0].attention.register_forward_hook(lambda *_, c=calls: c.append(1))
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(model, batch)
        results.append(grads(model))
        forwards.append(len(calls))
    assert forwards == [3, 6]  # the attacker's, the trap's and the nominal pass; recomputed once each
    plain, checkpointed = results
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
