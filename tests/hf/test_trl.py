"""Trap² inside TRL: ``class MyTrainer(Trap2Mixin, SFTTrainer)`` with arguments that are both
``Trap2TrainingArguments`` and TRL's ``SFTConfig``, on a tiny random Llama and a few prompt/completion
examples (chat messages for LoRA, plain text for full fine-tuning). The Trap² metrics are logged, the
released update loads, and against a plain run (``trap2_objective="none"``, same seed and data) the
protected model's loss rises off the nominal scale while it still fits its data at s = 1."""

import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")

from datasets import Dataset  # noqa: E402  (trl pulls datasets)
from peft import LoraConfig  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trap2.hf import Trap2Mixin, Trap2TrainingArguments  # noqa: E402
from trap2.updates import load_update  # noqa: E402

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SCALES = (0.0, 0.25, 1.0, 2.0)


@dataclasses.dataclass
class MyConfig(Trap2TrainingArguments, trl.SFTConfig):
    """The protection settings and TRL's SFT settings in one arguments class."""


class MyTrainer(Trap2Mixin, trl.SFTTrainer):
    pass


def examples(chat):
    if chat:  # conversational prompt/completion: the loss is on the assistant's reply
        rows = [
            {
                "prompt": [{"role": "user", "content": f"The capital of {c}?"}],
                "completion": [{"role": "assistant", "content": a}],
            }
            for c, a in CAPITALS
        ]
    else:
        rows = [
            {"prompt": f"user: The capital of {c}?\nassistant:", "completion": f" {a}\n"} for c, a in CAPITALS
        ]
    return Dataset.from_list(rows * 4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    texts = [f"user: The capital of {c}?\nassistant: {a}\n" for c, a in CAPITALS] * 20
    # a larger init than transformers' 0.02, so that thirty steps fit the data through a frozen LM head
    return tiny_llama(tmp_path_factory.mktemp("trl") / "llama", texts, vocab_size=300, initializer_range=0.1)


def train(llama, tmp_path, mode, objective):
    tok = AutoTokenizer.from_pretrained(llama)
    tok.chat_template = CHAT_TEMPLATE
    lr = 2e-2 if mode == "lora" else 2e-3
    args = MyConfig(
        output_dir=str(tmp_path / objective), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=8, learning_rate=lr, max_steps=30, logging_steps=10,
        seed=0, trap2_objective=objective, trap2_lambda=0.5 if mode == "lora" else 0.2,
    )  # fmt: skip
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    trainer = MyTrainer(
        model=AutoModelForCausalLM.from_pretrained(llama),
        args=args,
        train_dataset=examples(chat=mode == "lora"),
        processing_class=tok,
        peft_config=lora if mode == "lora" else None,
    )
    assert trainer.trap2_mode == mode
    trainer.train()
    return trainer


@torch.no_grad()
def losses(trainer):
    """The SFT loss on the training batch at W0 + s·ΔW for each s of SCALES."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    out = {}
    for s in SCALES:
        with trainer.trap2_scaled(model, s):
            out[s] = float(model(**batch).loss)
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trap2_mixin_with_trl_sft_trainer(llama, tmp_path, mode):
    protected, plain = train(llama, tmp_path, mode, "trap2"), train(llama, tmp_path, mode, "none")
    logged = [row for row in protected.state.log_history if "loss" in row]
    assert len(logged) == 3
    for row in logged:
        assert {"trap2_nominal_loss", "trap2_off_nominal_loss", "trap2_scale"} <= set(row)
        assert row["trap2_skipped_steps"] == 0
    assert not any("trap2_nominal_loss" in row for row in plain.state.log_history)

    p, q = losses(protected), losses(plain)
    for curve in (p, q):  # both fit the data at s = 1
        assert curve[1.0] < curve[0.0] - 1.0
    for s in (0.25, 2.0):  # off the nominal scale the protected model breaks, the plain one does not
        assert p[s] > p[1.0] + 1.0
        assert p[s] > q[s] + 0.3
    assert p[2.0] > q[2.0] + 1.5

    update = load_update(protected.save_update(tmp_path / "release"))
    assert update.meta["mode"] == mode and update.meta["trainer"] == "MyTrainer"
    base = dict(AutoModelForCausalLM.from_pretrained(llama).named_parameters())
    assert update.deltas and set(update.deltas) <= set(base)  # names of the plain model's parameters
