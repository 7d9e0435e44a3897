"""Trap2Trainer: the same objective as the library's, one s per optimizer step, skipped non-finite steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser, TrainingArguments

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError, TrainingError
from trap2.hf import Trap2Trainer, Trap2TrainingArguments
from trap2.hf.models import task_examples, task_model
from trap2.objectives import get_objective
from trap2.scaling import ScaledModel, base_params


def move_off_w0(model, reference) -> None:
    """Add the same small random step to every trainable weight of ``model`` and of its ``reference`` copy
    (fixed seed), so W ≠ W0 in both."""
    torch.manual_seed(1)
    ref = dict(reference.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                step = 0.05 * torch.randn_like(p)
                p.add_(step)
                ref[n].add_(step)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        trap2_lambda=0.1,
    )
    return Trap2TrainingArguments(**{**base, **kw})


def digits_model(digits, mode, seed=0):
    torch.manual_seed(seed)
    backbone = digits.make_backbone()
    if mode == "lora":
        backbone = get_peft_model(
            backbone, LoraConfig(r=4, lora_alpha=8, target_modules=list(digits.lora_targets))
        )
        for m in backbone.modules():  # B ≠ 0 so the adapter already changes the model
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    else:
        backbone.requires_grad_(True)
    return task_model(backbone, digits.task("rot90"))


def test_arguments_validate_and_parse(tmp_path):
    with pytest.raises(ConfigError, match="trap2_objective"):
        args(tmp_path, trap2_objective="trap2_split")
    with pytest.raises(ConfigError, match="delta"):
        args(tmp_path, trap2_delta=0.99)
    (parsed,) = HfArgumentParser(Trap2TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--trap2_lambda", "0.02", "--trap2_weight", "inv_sqrt"]
    )
    assert parsed.objective_config("lora") == ObjectiveConfig(lam=0.02, weight="inv_sqrt")
    assert args(tmp_path, trap2_lambda=None).objective_config("full").lam == 5e-3  # the paper's default
    assert args(tmp_path, trap2_lambda=None).objective_config("lora").lam == 1e-3
    # the extensions reach the Trainer (issue #20: law was dropped, collateral refused)
    extended = ObjectiveConfig(lam=0.1, law="log", collateral=0.3)
    kwargs = Trap2TrainingArguments.objective_arguments(extended)
    assert args(tmp_path, **kwargs).objective_config("lora") == extended
    with pytest.raises(ConfigError, match="collateral must be >= 0"):
        args(tmp_path, trap2_collateral=-1.0)
    # the hardening's operators and lookahead reach it too
    hardened = ObjectiveConfig(
        lam=0.1, operators="scale,trim", keep_min=0.2, lookahead_steps=2, lookahead_objective="flatten"
    )
    assert (
        args(tmp_path, **Trap2TrainingArguments.objective_arguments(hardened)).objective_config("lora")
        == hardened
    )
    with pytest.raises(ConfigError, match="unknown operator"):
        args(tmp_path, trap2_operators="ties")


def test_operator_draws_are_not_scales(tmp_path, digits):
    trainer = Trap2Trainer(model=digits_model(digits, "lora"), args=args(tmp_path, trap2_operators="trim"))
    with pytest.raises(ConfigError, match="use trap2_draws"):
        trainer.trap2_scales(0)


def test_balance_is_refused_not_ignored(tmp_path, digits):
    with pytest.raises(ConfigError, match="trap2_balance is implemented by the built-in loop only"):
        Trap2Trainer(model=digits_model(digits, "lora"), args=args(tmp_path, trap2_balance=1.0))


def test_plain_training_arguments_are_refused(tmp_path, digits):
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="Trap2TrainingArguments"):
        Trap2Trainer(model=digits_model(digits, "lora"), args=plain)


class Logits(torch.nn.Module):
    """The built-in loop's view of a Trainer model: input tensor -> logits; ``backbone`` is what the
    loop's feature tap reads (the module whose output the Trainer's collateral term uses)."""

    def __init__(self, model: torch.nn.Module, backbone: torch.nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.backbone, self.key = model, backbone, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x})["logits"]


def step_gradients(tmp_path, model, batch, key, view, cfg, seed=3):
    """Gradients of one Trainer micro-step on ``batch`` and of Trap2Objective.backward on the same batch
    and scale; ``view(reference)`` is the reference's Logits."""
    reference = copy.deepcopy(model)
    trainer = Trap2Trainer(
        model=model,
        args=args(tmp_path, seed=seed, **Trap2TrainingArguments.objective_arguments(cfg)),
        train_dataset=[batch],
    )
    assert trainer.trap2_config == cfg  # every knob reached the Trainer
    logits_of = view(reference)
    full = trainer.trap2_mode == "full"
    scaled = ScaledModel(logits_of, trainer.trap2_mode, base_params(logits_of) if full else None)
    if full:  # W ≠ W0 (both kept W0 already), else the collateral term has no gradient
        move_off_w0(model, reference)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() in a real run
    trainer.training_step(model, batch)

    # the library's objective, with the scale the trainer draws for step 0
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    reference.train()
    stats = get_objective(cfg).backward(scaled, batch[key], batch["labels"], F.cross_entropy, gen)
    assert stats.scales == [d.s for d in trainer.trap2_draws(0)]
    if cfg.operators == "scale":
        assert stats.scales == trainer.trap2_scales(0)

    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(g.abs().sum()) > 0 for g in got.values())
    return trainer, stats


PAPER = ObjectiveConfig(lam=0.1)
EXTENDED = ObjectiveConfig(lam=0.1, law="log", collateral=0.3, s_min=0.1, bound=20.0)
HARDENED = ObjectiveConfig(
    lam=0.1, operators="layer_scale,trim,spectral,isotropic", n_samples=3, collateral=0.2
)


@pytest.mark.parametrize("cfg", [PAPER, EXTENDED, HARDENED], ids=["paper", "log-collateral", "operators"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_gradient_equals_library_objective(tmp_path, digits, mode, cfg):
    """One Trainer micro-step accumulates exactly the gradient of Trap2Objective on the same batch and s,
    with the paper's objective and with its extensions (log-uniform s, the collateral term)."""
    model = digits_model(digits, mode)
    probe = Trap2Trainer(model=model, args=args(tmp_path), train_dataset=task_examples(digits.task("rot90")))
    batch = probe.data_collator(task_examples(digits.task("rot90"))[:16])
    trainer, stats = step_gradients(
        tmp_path, model, batch, "pixel_values", lambda m: Logits(m, m.backbone, "pixel_values"), cfg
    )
    if cfg.collateral:
        assert stats.disruption > 1e-4
        assert trainer._trap2_metrics["trap2_disruption"] == [pytest.approx(stats.disruption, rel=1e-5)]


def tiny_bert_classifier(mode: str, dropout: float = 0.0):
    """A tiny random BERT sequence classifier, LoRA (B ≠ 0) or fully trainable encoder, and a batch of 8."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )
    )  # fmt: skip
    if mode == "lora":
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
        )
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    else:
        model.bert.requires_grad_(True)
        model.classifier.requires_grad_(False)
    return model, {"input_ids": torch.randint(0, 50, (8, 6)), "labels": torch.arange(8) % 3}


def train_recording(trainer, monkeypatch) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``trainer.train()``; return the loss of every ``compute_loss`` call and the trained weights."""
    losses = []
    inner = trainer.compute_loss

    def spy(*a, **kw):
        j = inner(*a, **kw)
        losses.append(j.detach().clone())
        return j

    monkeypatch.setattr(trainer, "compute_loss", spy)
    trainer.train()
    model = trainer.model
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_collateral_on_a_plain_transformers_model_uses_the_last_hidden_state(tmp_path, mode):
    """A model without a ``backbone`` (BertForSequenceClassification): the collateral features are its
    base model's last hidden state, and the gradient equals the built-in loop's with that tap."""
    model, batch = tiny_bert_classifier(mode)  # no dropout: the two paths run one after the other

    def view(m):
        hf = m.get_base_model() if mode == "lora" else m
        return Logits(m, hf.bert, "input_ids")

    trainer, stats = step_gradients(tmp_path, model, batch, "input_ids", view, EXTENDED)
    assert stats.disruption > 1e-4
    assert trainer._trap2_metrics["trap2_disruption"] == [pytest.approx(stats.disruption, rel=1e-5)]


def test_one_scale_per_optimizer_step_under_accumulation(tmp_path, digits):
    model = digits_model(digits, "lora")
    trainer = Trap2Trainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=4,
            gradient_accumulation_steps=3,
            per_device_train_batch_size=8,
            logging_steps=2,
        ),
        train_dataset=task_examples(digits.task("rot90")),
    )
    seen = []
    scaled = trainer.trap2_scaled
    trainer.trap2_scaled = lambda m, s: (seen.append((trainer.state.global_step, s)), scaled(m, s))[1]
    trainer.train()
    assert [step for step, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for step in range(4):
        (s,) = trainer.trap2_scales(step)
        assert [x for k, x in seen if k == step] == [s, s, s]
        assert 0.05 <= s <= 0.95 or 1.05 <= s <= 2.0
    assert len({s for _, s in seen}) == 4
    logged = [r for r in trainer.state.log_history if "trap2_nominal_loss" in r]
    assert logged and all(r["trap2_off_nominal_loss"] > 0 for r in logged)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, digits):
    model = digits_model(digits, "lora")
    examples = task_examples(digits.task("rot90"))[:32]
    poisoned = [dict(e) for e in examples]
    for e in poisoned[:16]:  # the first batch (sequential order below) is all NaN
        e["pixel_values"] = torch.full_like(e["pixel_values"], float("nan"))
    trainer = Trap2Trainer(
        model=model,
        args=args(tmp_path, max_steps=2, logging_steps=1, trap2_max_nonfinite_in_row=2),
        train_dataset=poisoned,
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(poisoned)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.trap2_skipped_steps == 1
    assert trainer.state.log_history[0]["trap2_skipped_steps"] == 1
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the clean step did update

    all_bad = [dict(e, pixel_values=torch.full_like(e["pixel_values"], float("nan"))) for e in examples]
    trainer = Trap2Trainer(
        model=digits_model(digits, "lora"),
        args=args(tmp_path, max_steps=5, trap2_max_nonfinite_in_row=2),
        train_dataset=all_bad,
    )
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        trainer.train()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["none", "trap2"])
def test_trainer_matches_builtin_loop(tmp_path, digits, objective):
    """The two training paths reach the same standalone accuracy and scaling curve (within noise)."""
    from trap2.config import LoraSettings, TrainConfig
    from trap2.eval.evaluate import scaling_curve
    from trap2.hf.suite_train import train_with_trainer
    from trap2.training.loop import train_update

    cfg = TrainConfig(
        steps=300, objective=ObjectiveConfig(name=objective, lam=0.1), lora=LoraSettings(r=8, alpha=8)
    )
    loop = train_update(digits, "rot90", cfg).update
    trainer, _ = train_with_trainer(digits, "rot90", cfg, tmp_path)
    assert trainer.meta["objective"]["name"] == objective
    task = digits.task("rot90")
    a = scaling_curve(digits.make_backbone(), task, loop.dense(), [0.5, 1.0, 2.0])
    b = scaling_curve(digits.make_backbone(), task, trainer.dense(), [0.5, 1.0, 2.0])
    assert abs(a[1] - b[1]) <= 0.03 and min(a[1], b[1]) >= 0.85
    if objective == "trap2":
        assert max(a[0], a[2], b[0], b[2]) <= 0.3  # both collapse off the nominal scale
    else:
        assert min(a[0], b[0]) >= 0.75 and abs(a[0] - b[0]) <= 0.05


def test_bf16_autocast_on_cpu(tmp_path, digits):
    """Mixed precision where the device has it: bf16 autocast on CPU trains, both passes under autocast."""
    model = digits_model(digits, "lora")
    trainer = Trap2Trainer(
        model=model,
        args=args(tmp_path, max_steps=3, bf16=True, logging_steps=1),
        train_dataset=task_examples(digits.task("rot90")),
    )
    dtypes = []
    linear = next(m for m in model.backbone.modules() if type(m) is torch.nn.Linear)
    hook = linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.train()
    hook.remove()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) % 6 == 0  # nominal + off-nominal, 3 steps
    logged = [r for r in trainer.state.log_history if "trap2_off_nominal_loss" in r]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 masters
