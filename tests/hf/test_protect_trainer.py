"""Trap2ProtectTrainer: the self-distillation step through the Trainer equals the library's objective,
the teacher is the model as given, and the release records it (tiny digits model and tiny random BERT)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_trainer import Logits, args, digits_model, move_off_w0, train_recording

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.hf import Trap2ProtectTrainer, Trap2Trainer, Trap2TrainingArguments
from trap2.hf.models import task_examples
from trap2.objectives.operators import Draw
from trap2.objectives.self_distill import SelfDistillObjective, distill_loss, teacher_ce
from trap2.protect import ProtectConfig, trap_steps, update_fingerprint
from trap2.scaling import Dense, Scale, ScaledModel, base_params
from trap2.updates import load_update


def test_step_gradient_equals_the_library_objective(tmp_path, digits):
    """One micro-step: the gradient of KL(teacher ‖ f_1) − λ·w(s)·CE(f_s, argmax teacher), with the teacher
    the model as given and s the one the Trainer draws for step 0; labels in the batch are ignored."""
    model = digits_model(digits, "lora")
    reference = copy.deepcopy(model)
    examples = task_examples(digits.task("rot90"))[:16]
    cfg = ObjectiveConfig(lam=0.3, weight="inv")
    trainer = Trap2ProtectTrainer(
        model=model, args=args(tmp_path, seed=3, trap2_lambda=0.3), train_dataset=examples
    )
    batch = trainer.data_collator(examples)
    batch["labels"] = torch.randint(0, 10, (16,))  # wrong labels: must not matter
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)

    view = Logits(reference, reference.backbone, "pixel_values")
    with torch.no_grad():
        teacher = view(batch["pixel_values"])  # the model as given, dropout-free
    gen = torch.Generator().manual_seed(3 * 1_000_003)
    objective = SelfDistillObjective(ObjectiveConfig(name="trap2_distill", lam=cfg.lam))
    stats = objective.backward(
        ScaledModel(view, "lora"), batch["pixel_values"], teacher, F.cross_entropy, gen
    )
    assert stats.scales == trainer.trap2_scales(0)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert stats.nominal == pytest.approx(0.0, abs=1e-6)  # the student starts at the teacher


def test_protect_trains_and_records_the_teacher(tmp_path, digits):
    model = digits_model(digits, "lora")
    before = Trap2ProtectTrainer(model=model, args=args(tmp_path), train_dataset=[])._trap2_update(model)
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, max_steps=8, trap2_lambda=0.3, learning_rate=2e-3),
        train_dataset=[{"pixel_values": e["pixel_values"]} for e in task_examples(digits.task("rot90"))],
    )
    trainer.train()
    path = trainer.save_update(tmp_path / "protected", module=model.backbone, task="rot90")
    u = load_update(path)
    assert u.meta["objective"]["name"] == "trap2_distill" and u.meta["objective"]["lam"] == 0.3
    assert u.meta["teacher"]["fingerprint"] == update_fingerprint(type(u)({k: v for k, v in before.items()}))
    assert u.meta["protect"]["targets"] == "teacher" and u.meta["task"] == "rot90"
    x = digits.task("rot90").test.x
    student = Logits(model, model.backbone, "pixel_values").eval()
    teacher = Logits(trainer.trap2_teacher, trainer.trap2_teacher.backbone, "pixel_values")
    with torch.no_grad():
        agree = float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())
    assert agree >= 0.8  # 8 steps: still the teacher's predictions at s = 1


def test_token_logits_are_averaged_over_the_attention_mask(tmp_path):
    """A tiny random BERT token classifier: padded positions do not enter either term."""
    model, batch = tiny_bert()
    mask = batch["attention_mask"]
    trainer = Trap2ProtectTrainer(
        model=model, args=args(tmp_path, seed=1, trap2_lambda=0.2), train_dataset=[batch]
    )
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(batch))
    (s,) = trainer.trap2_scales(0)
    with torch.no_grad():
        t = trainer.trap2_teacher(**batch).logits
        with trainer.trap2_scaled(model, s):
            off = teacher_ce(model(**batch).logits, t, mask)
        nominal = distill_loss(model(**batch).logits, t, 1.0, mask)
        cut = teacher_ce(model(**batch).logits[:, :4], t[:, :4])  # the same, without the padded positions
    assert float(loss) == pytest.approx(float(nominal - 0.2 / s * off), rel=1e-5, abs=1e-6)
    assert float(nominal) == pytest.approx(0.0, abs=1e-6)
    assert float(teacher_ce(model(**batch).logits, t, mask)) == pytest.approx(float(cut), rel=1e-5)
    assert isinstance(trainer.args, Trap2TrainingArguments)


def tiny_bert():
    """A tiny random BERT token classifier with a LoRA adapter (B ≠ 0) and a padded batch of 4 × 6 tokens."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    bert = BertForTokenClassification(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    )  # fmt: skip
    model = get_peft_model(bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


# --- the hardened objective's operators (trap2_operators) --------------------------------------------

FAMILY = "layer_scale,trim,spectral,isotropic"
HARDENED = ObjectiveConfig(lam=0.3, operators=FAMILY, n_samples=3, collateral=0.2, keep_min=0.3)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_gradient_with_operators_equals_the_library_objective(tmp_path, digits, mode):
    """trap2_operators (and trap2_collateral) reach the protect trainer: one micro-step accumulates the
    gradient of trap2_distill at the operator draws Trap2Trainer makes for step 0 (same generator)."""
    model = digits_model(digits, mode)
    reference = copy.deepcopy(model)
    view = Logits(reference, reference.backbone, "pixel_values")
    scaled = ScaledModel(view, mode, base_params(view) if mode == "full" else None)
    examples = task_examples(digits.task("rot90"))[:16]
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, seed=3, **Trap2TrainingArguments.objective_arguments(HARDENED)),
        train_dataset=examples,
    )
    assert trainer.trap2_config == dataclasses.replace(HARDENED, name="trap2_distill")
    if mode == "full":  # W ≠ W0 (both kept W0 already), else every operator draw is of a zero update
        move_off_w0(model, reference)
    batch = trainer.data_collator(examples)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)

    with torch.no_grad():  # the teacher: the model as given to the trainer
        teacher = Logits(trainer.trap2_teacher, trainer.trap2_teacher.backbone, "pixel_values")(
            batch["pixel_values"]
        )
    reference.train()
    objective = SelfDistillObjective(dataclasses.replace(HARDENED, name="trap2_distill"))
    gen = torch.Generator().manual_seed(3 * 1_000_003)
    stats = objective.backward(scaled, batch["pixel_values"], teacher, F.cross_entropy, gen)
    draws = trainer.trap2_draws(0)
    assert stats.scales == [d.s for d in draws]
    assert {d.operator for d in draws} <= set(FAMILY.split(",")) and all(d.transforms for d in draws)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    metrics = trainer._trap2_metrics
    assert metrics["trap2_off_nominal_loss"] == [pytest.approx(stats.off_nominal, rel=1e-5)]
    assert stats.disruption > 1e-4
    assert metrics["trap2_disruption"] == [pytest.approx(stats.disruption, rel=1e-5)]


def test_loss_at_a_fixed_operator_draw_equals_the_hand_merged_model(tmp_path, monkeypatch):
    """A transformers model (tiny BERT, masked tokens) and two fixed draws, per-layer scales and a trim:
    J = KL(t‖f_1) − λ/2·Σ w(s)·CE(f_op, argmax t), each f_op a copy of the model with W0 + op(ΔW) merged
    into its base weights by hand and its LoRA branches off."""
    model, batch = tiny_bert()
    mask = batch["attention_mask"]
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, trap2_lambda=0.2, trap2_operators="layer_scale,trim", trap2_n_samples=2),
        train_dataset=[batch],
    )
    units = [u.name for u in trainer._trap2_scaled.units()]
    assert len(units) == 2  # query and value of the one layer
    layer_s = {name: 0.3 + 0.4 * i for i, name in enumerate(units)}
    draws = [
        Draw("layer_scale", 0.5, {name: Scale(s) for name, s in layer_s.items()}),
        Draw(
            "trim",
            1.5,
            {
                name: Dense(
                    lambda d: 1.5 * d * (d.abs() >= d.abs().flatten().topk(d.numel() // 2).values.min())
                )
                for name in units
            },
        ),
    ]
    monkeypatch.setattr(trainer, "trap2_draws", lambda step=None: draws)

    def by_hand(name: str, delta: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0:
            return layer_s[name] * delta
        kth = delta.abs().flatten().sort(descending=True).values[delta.numel() // 2 - 1]  # top half kept
        return 1.5 * delta * (delta.abs() >= kth)

    model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        t = trainer.trap2_teacher(**batch).logits
        nominal = distill_loss(model(**batch).logits, t, 1.0, mask)
        offs = []
        for i in range(2):
            merged = copy.deepcopy(model)
            for name, m in merged.named_modules():
                if name in units:
                    delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                    m.base_layer.weight += by_hand(name, delta, i)
                    m.lora_B["default"].weight.zero_()
            offs.append(teacher_ce(merged(**batch).logits, t, mask))
    want = nominal - 0.2 / 2 * (offs[0] / 0.5 + offs[1] / 1.5)
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert abs(float(offs[0] - offs[1])) > 1e-4  # the two draws are different models
    assert trainer._trap2_metrics["trap2_off_nominal_loss"] == [pytest.approx(float(sum(offs)) / 2, rel=1e-5)]


@pytest.mark.parametrize("cls", [Trap2Trainer, Trap2ProtectTrainer])
def test_the_trainers_refuse_the_same_settings(tmp_path, digits, monkeypatch, cls):
    """The protect trainer refuses what Trap2Trainer refuses, with the same message: operators other than
    'scale' and the lookahead under FSDP / DeepSpeed (faked: accelerate's distributed_type)."""
    from accelerate import Accelerator

    trainer = cls(model=digits_model(digits, "lora"), args=args(tmp_path, trap2_operators="trim"))
    with pytest.raises(ConfigError, match="use trap2_draws"):
        trainer.trap2_scales(0)
    for sharded in ("FSDP", "DEEPSPEED"):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, kind=sharded: kind))
        with pytest.raises(ConfigError, match="under FSDP / DeepSpeed the parameters are sharded"):
            cls(model=digits_model(digits, "lora"), args=args(tmp_path, trap2_operators="scale,trim"))
        with pytest.raises(ConfigError, match="^trap2_lookahead_steps: the attacker's steps move every"):
            cls(model=digits_model(digits, "lora"), args=args(tmp_path, trap2_lookahead_steps=1))
        assert cls(model=digits_model(digits, "lora"), args=args(tmp_path)).trap2_config.operators == "scale"


# --- trap2 protect's cost knobs: off_fraction, off_every, repair ----------------------------------------


def spy_off_nominal(trainer, monkeypatch) -> list[tuple[int, float]]:
    """Record (optimizer step, λ) of every call of the shared off-nominal loop, which still runs."""
    calls = []
    inner = trainer.trap2_off_nominal

    def spy(*a, **kw):
        calls.append((trainer.state.global_step, trainer.trap2_config.lam))
        return inner(*a, **kw)

    monkeypatch.setattr(trainer, "trap2_off_nominal", spy)
    return calls


def unlabelled(digits):
    return [{"pixel_values": e["pixel_values"]} for e in task_examples(digits.task("rot90"))]


def test_off_every_traps_every_kth_optimizer_step_with_lambda_k(tmp_path, digits, monkeypatch):
    """off_every = 3 over 7 optimizer steps of 2 micro-batches: the off-nominal loop runs in both micro-batches
    of steps 3 and 6 (global_step 2 and 5) with λ·3, and nowhere else; λ is restored and recorded as given."""
    model = digits_model(digits, "lora")
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=7,
            trap2_lambda=0.3,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
        ),
        train_dataset=unlabelled(digits),
        off_every=3,
    )
    calls = spy_off_nominal(trainer, monkeypatch)
    trainer.train()
    assert [step for step, _ in calls] == [2, 2, 5, 5]
    assert all(lam == pytest.approx(0.9) for _, lam in calls)
    assert trainer.trap2_config.lam == 0.3
    u = load_update(trainer.save_update(tmp_path / "protected", module=model.backbone, task="rot90"))
    assert u.meta["objective"]["lam"] == 0.3
    # the settings as trap2 protect records them (its protect_settings), and the run's length
    assert u.meta["protect"] == {
        "targets": "teacher",
        "match": "kl",
        "temperature": 1.0,
        "repair": 0.0,
        "off_fraction": 1.0,
        "off_every": 3,
        "steps": 7,
    }


@pytest.mark.parametrize(("fraction", "n"), [(0.7, 3), (0.1, 1), (1.0, 4)])
def test_off_fraction_the_off_nominal_pass_sees_the_first_examples(tmp_path, fraction, n):
    """Tiny BERT, B = 4: the off-nominal forward (and the collateral's pass at s = 0) sees the batch's first
    round(4·f) examples (at least one), the nominal one all 4; J = KL(t‖f_1) over the batch − λ·w(s)·(CE to
    argmax t + μ·(1 − cos)) over the first n, computed by hand."""
    model, batch = tiny_bert()
    mask = batch["attention_mask"]
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, seed=1, trap2_lambda=0.2, trap2_collateral=0.5),
        train_dataset=[batch],
        off_fraction=fraction,
    )
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(batch))
    hook.remove()
    assert seen == [n, n, 4]  # s = 0 (collateral), s, then s = 1
    (s,) = trainer.trap2_scales(0)
    first = {k: v[:n] for k, v in batch.items()}
    with torch.no_grad():
        t = trainer.trap2_teacher(**batch).logits
        nominal = distill_loss(model(**batch).logits, t, 1.0, mask)
        with trainer.trap2_scaled(model, 0.0):
            base = model.get_base_model().bert(**first).last_hidden_state
        with trainer.trap2_scaled(model, s):
            off = teacher_ce(model(**first).logits, t[:n], mask[:n])
            feats = model.get_base_model().bert(**first).last_hidden_state
        dis = (1 - F.cosine_similarity(feats, base, dim=-1)).mean()
    assert float(dis) > 1e-4
    assert float(loss) == pytest.approx(float(nominal - 0.2 / s * (off + 0.5 * dis)), rel=1e-5, abs=1e-6)


def test_repair_steps_are_the_teacher_match_alone(tmp_path, digits, monkeypatch):
    """repair = 0.25 of 8 steps with off_every = 2: the trap steps are 2, 4, 6 (the built-in loop's
    trap_steps = 6), steps 7–8 are nominal-only; at a repair step J is KL(t‖f_1) and its gradient alone."""
    model = digits_model(digits, "lora")
    trainer = Trap2ProtectTrainer(
        model=model,
        args=args(tmp_path, max_steps=8, trap2_lambda=0.3, per_device_train_batch_size=8),
        train_dataset=unlabelled(digits),
        off_every=2,
        repair=0.25,
    )
    calls = spy_off_nominal(trainer, monkeypatch)
    trainer.train()
    assert [step for step, _ in calls] == [1, 3, 5]
    assert trap_steps(ProtectConfig(repair=0.25), 8) == 6

    # one more micro-step at step 8 (global_step 7, a repair step), against the KL computed by hand
    batch = trainer.data_collator(unlabelled(digits)[:8])
    trainer.state.global_step = 7
    model.train()
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(calls) == 3
    model.zero_grad()
    view = Logits(model, model.backbone, "pixel_values")
    teacher = Logits(trainer.trap2_teacher, trainer.trap2_teacher.backbone, "pixel_values")
    with torch.no_grad():
        t = teacher(batch["pixel_values"])
    distill_loss(view(batch["pixel_values"]), t).backward()
    for name, g in got.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-7)


class _Before(Trap2ProtectTrainer):
    """The protect trainer's compute_loss before the cost knobs (main at bb60652), as a reference."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from trap2.hf.protect import _logits
        from trap2.objectives.base import same_random_draws

        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        with torch.no_grad():
            teacher = _logits(self.trap2_teacher(**inputs)).detach()
        token_mask = mask if mask is not None and teacher.dim() == 3 else None
        with same_random_draws(self.args.device) as replay:
            off_sum = self.trap2_off_nominal(
                model,
                lambda: teacher_ce(_logits(model(**inputs)), teacher, token_mask),
                replay,
                num_items_in_batch,
            )
            outputs = model(**inputs)
            nominal = distill_loss(_logits(outputs), teacher, self.trap2_temperature, token_mask)
        self._trap2_metrics["trap2_nominal_loss"].append(float(nominal.detach()))
        j = nominal + off_sum
        return (j, outputs) if return_outputs else j


def test_default_knobs_are_bit_identical_to_before(tmp_path, digits, monkeypatch):
    """With off_fraction = 1, off_every = 1, repair = 0 (given explicitly) four training steps give exactly
    the losses and the weights of the trainer before the knobs."""
    runs = {}
    for cls, knobs in ((_Before, {}), (Trap2ProtectTrainer, dict(off_fraction=1.0, off_every=1, repair=0.0))):
        model = digits_model(digits, "lora")
        trainer = cls(
            model=model,
            args=args(tmp_path, max_steps=4, trap2_lambda=0.3, trap2_collateral=0.2, learning_rate=2e-3),
            train_dataset=unlabelled(digits),
            **knobs,
        )
        runs[cls] = train_recording(trainer, monkeypatch)
    (before, w_before), (after, w_after) = runs.values()
    assert len(before) == len(after) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (before, after)
    assert w_before.keys() == w_after.keys()
    assert all(torch.equal(w_before[n], w_after[n]) for n in w_before)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(off_fraction=0.0),
        dict(off_fraction=1.5),
        dict(off_every=0),
        dict(off_every=2.0),
        dict(off_every=True),
        dict(repair=1.0),
        dict(repair=-0.1),
        dict(temperature=0.0),
    ],
)
def test_bad_knobs_are_refused_with_the_protect_messages(tmp_path, digits, knobs):
    """The same one-line ConfigError as `trap2 protect` (ProtectConfig) gives, before the Trainer is built."""
    with pytest.raises(ConfigError) as want:
        ProtectConfig(**knobs)
    with pytest.raises(ConfigError) as got:
        Trap2ProtectTrainer(model=digits_model(digits, "lora"), args=args(tmp_path / "out"), **knobs)
    assert str(got.value) == str(want.value)
    assert not (tmp_path / "out").exists()
