"""Releases know what they are: Trap2Trainer.save_update records the task and the base fingerprint (the
folder's weights file, as the suites compute it, or the W0 tensors for a model built in memory), and an
update made on another base is refused by Update.check_base."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from trap2.data.prepare import weights_fingerprint as folder_fingerprint
from trap2.errors import UpdateFileError
from trap2.hf import Trap2Trainer, Trap2TrainingArguments, lora_config
from trap2.updates import STATE_FINGERPRINT, load_update, tensors_fingerprint

N = 8


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def train(model, tmp_path, mode):
    """``mode``: 'lora' wraps the model in a LoRA adapter, 'full' trains it whole, 'none' as given."""
    if mode == "lora":
        model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (N, 8), generator=gen)
    rows = [{"input_ids": ids[i], "labels": torch.tensor(i % 3)} for i in range(N)]
    args = Trap2TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, trap2_lambda=0.1,
    )  # fmt: skip
    trainer = Trap2Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_update_records_task_and_the_folder_fingerprint(tmp_path, mode):
    tiny_bert().save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    trainer = train(model, tmp_path, mode)
    update = load_update(trainer.save_update(tmp_path / "u", task="sst"))
    assert update.meta["task"] == "sst" and update.meta["mode"] == mode
    assert update.meta["base_fingerprint"] == folder_fingerprint(tmp_path / "base")
    given = load_update(trainer.save_update(tmp_path / "u2", task="sst", base_fingerprint="abc"))
    assert given.meta["base_fingerprint"] == "abc"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_in_memory_base_is_fingerprinted_from_its_weights_and_another_base_refused(tmp_path, mode):
    model = tiny_bert(0)
    w0 = {n: p.detach().clone() for n, p in copy.deepcopy(model).named_parameters()}
    trainer = train(model, tmp_path, mode)
    update = load_update(trainer.save_update(tmp_path / "u", task="sst"))
    fp = update.meta["base_fingerprint"]
    assert fp.startswith(STATE_FINGERPRINT) and fp == tensors_fingerprint(w0)
    update.check_base(w0, "e" * 64)  # the same base passes, whatever file hash the suite records
    other = dict(tiny_bert(1).named_parameters())
    with pytest.raises(UpdateFileError, match=r"^u: made for base [0-9a-f]{12}…, not this base"):
        update.check_base(other, "f" * 64, where="u")
    # a bf16 base and its float32 upcast are the same base
    half = {n: t.bfloat16() for n, t in w0.items()}
    assert tensors_fingerprint(half) == tensors_fingerprint({n: t.float() for n, t in half.items()})


def test_a_wrapper_around_the_released_model_still_records_the_folder_fingerprint(tmp_path):
    """A pooling/head module around the PEFT model (what the Trainer is given) has no model folder of its
    own; the release (``module``) does, and its folder's file hash is what a suite records."""
    tiny_bert().save_pretrained(tmp_path / "base")
    peft = get_peft_model(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"),
        lora_config(tiny_bert(), r=4, alpha=8),
    )

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels=None):
            return self.inner(input_ids=input_ids, labels=labels)

    trainer = train(Wrapper(peft), tmp_path, "none")
    update = load_update(trainer.save_update(tmp_path / "u", module=peft, task="sst"))
    assert update.meta["base_fingerprint"] == folder_fingerprint(tmp_path / "base")
