"""Trap2ProtectTrainer: the self-distillation step through the Trainer equals the library's objective,
the teacher is the model as given, and the release records it (tiny digits model and tiny random BERT)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_trainer import Logits, args, digits_model

from trap2.config import ObjectiveConfig
from trap2.hf import Trap2ProtectTrainer, Trap2TrainingArguments
from trap2.hf.models import task_examples
from trap2.objectives.self_distill import SelfDistillObjective, distill_loss, teacher_ce
from trap2.protect import update_fingerprint
from trap2.scaling import ScaledModel
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
    batch = {"input_ids": ids, "attention_mask": mask}
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
