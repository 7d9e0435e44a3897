"""Tiny randomly initialised HF models (ViT, CNN, encoder, decoder) through Trap2Trainer, LoRA and full:
training changes the update, the scaled forward equals W0 + s·ΔW by hand, and the result reloads in
stock PEFT / transformers."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from trap2.hf import Trap2Trainer, Trap2TrainingArguments, default_lora_targets, lora_config
from trap2.hf.models import HeadedModel
from trap2.updates import Update, load_update

N = 8


def _headed(backbone: nn.Module, width: int) -> HeadedModel:
    return HeadedModel(backbone, nn.Linear(width, 3))


def build(arch: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    labels = torch.arange(N) % 3
    if arch == "clip":
        cfg = CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
        return _headed(CLIPVisionModel(cfg), 16), {
            "pixel_values": torch.randn(N, 3, 16, 16),
            "labels": labels,
        }
    if arch == "convnext":
        cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
        return _headed(ConvNextModel(cfg), 16), {"pixel_values": torch.randn(N, 3, 32, 32), "labels": labels}
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return _headed(BertModel(cfg), 16), {"input_ids": torch.randint(0, 50, (N, 8)), "labels": labels}
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    ids = torch.randint(0, 50, (N, 8))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}


ARCHS = ["clip", "convnext", "bert", "llama"]


def test_default_lora_targets_per_architecture():
    expect = {
        "clip": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
        "convnext": {"pwconv1", "pwconv2"},
        "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    }
    for arch, names in expect.items():
        assert set(default_lora_targets(build(arch)[0])) == names
    bert = default_lora_targets(build("bert")[0])
    assert bert and not any("pooler" in n for n in bert)
    assert {n.split(".")[-1] for n in bert} == {"query", "key", "value", "dense"}
    # no head is ever targeted; an unknown architecture falls back to its non-head Linear layers
    assert default_lora_targets(nn.Sequential(nn.Linear(2, 2))) == ["0"]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out["logits"]


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("arch", ARCHS)
def test_protect_scale_and_reload(tmp_path, arch, mode):
    model, batch = build(arch)
    w0_model = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in w0_model.named_parameters()}
    if mode == "lora":
        model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    else:
        (model.backbone if isinstance(model, HeadedModel) else model).requires_grad_(True)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(N)]
    args = Trap2TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        trap2_lambda=0.1,
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert trainer.trap2_mode == mode
    model.eval()

    if mode == "lora":
        delta = Update.from_peft_model(model).dense()
    else:
        delta = {n: p.detach() - w0[n] for n, p in model.named_parameters() if p.requires_grad}
    assert delta and max(float(d.abs().max()) for d in delta.values()) > 0  # training changed the update
    with torch.no_grad():
        for s in (0.3, 1.0, 1.7):
            with trainer.trap2_scaled(model, s):
                got = logits(model, batch)
            params = {n: w0[n] + s * d for n, d in delta.items()}
            want = functional_call(w0_model, params, kwargs={k: v for k, v in batch.items() if k != "labels"})
            torch.testing.assert_close(got, want["logits"], rtol=1e-4, atol=1e-5, msg=f"s={s}")

        # stock loading
        folder = tmp_path / "saved"
        if mode == "lora":
            model.save_pretrained(folder)
            reloaded = PeftModel.from_pretrained(copy.deepcopy(w0_model), folder).eval()
        else:
            inner = model.backbone if isinstance(model, HeadedModel) else model
            inner.save_pretrained(folder)
            again = type(inner).from_pretrained(folder)
            reloaded = HeadedModel(again, model.head) if isinstance(model, HeadedModel) else again
            reloaded.eval()
        torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=1e-5, atol=1e-6)

    # trap2's release format: the same ΔW, with the protection settings recorded
    module = model.backbone if mode == "full" and isinstance(model, HeadedModel) else None
    update = load_update(trainer.save_update(tmp_path / "update", module=module))
    assert update.meta["objective"]["name"] == "trap2" and update.meta["mode"] == mode
    prefix = "backbone." if module is not None else ""
    for n, d in update.dense().items():
        torch.testing.assert_close(d, delta[prefix + n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_activation_checkpointing_recomputes_at_the_same_scale(tmp_path, mode):
    """With gradient checkpointing the off-nominal pass is recomputed during its backward: the step's
    gradient must equal the one computed without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model, batch = build("llama")
        if mode == "lora":
            model = get_peft_model(model, lora_config(model, r=4, alpha=8))
            for m in model.modules():  # B ≠ 0, so the LoRA A factors get a gradient too
                if hasattr(m, "lora_B"):
                    torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
        args = Trap2TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            trap2_lambda=0.5,
        )
        trainer = Trap2Trainer(model=model, args=args)
        if mode == "full":  # W ≠ W0 (captured above), or every scale would give the same model
            torch.manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if mode == "lora":
                model.enable_input_require_grads()
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(model, dict(batch))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
