"""Built-in offline suite ``lm``: the paper's LLM setting (a causal LM, GSM8K-format generation tasks,
exact match of greedy answers, w(s) = 1/√s) on a small pretrained decoder that ships with trap2.

The backbone is a ``LlamaForCausalLM`` of ~1.3 M parameters over a character-level tokenizer
(:mod:`trap2.suites.lm_text`), pretrained on a general mixture of symbolic arithmetic / string lines and
English BIG-bench text (``scripts/pretrain_lm.py``; the command, seed, steps and validation loss are in
``assets/lm/pretrain.json``). It is a standard HF model folder (float16 safetensors, config, tokenizer),
so PEFT, the Trainer path, mergekit and every attack take it as they take any causal LM.

The tasks (:mod:`trap2.suites.lm_tasks`) are GSM8K-format rows drawn with a fixed seed; each example is
``Question: {question}\\nAnswer:`` + `` <work> #### <value>`` + EOS (the ``math`` suite's prompt), the
loss on the answer tokens only, the score exact match of the final answer (:func:`~trap2.suites.math_lm.final_answer`:
the number, or the short text, after ``####``) in the greedy generation. Parameter
names are the transformers model's own (``model.layers.0.self_attn.q_proj.weight``), so an adapter
trained here applies to the plain model folder by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from trap2.data.prepare import weights_fingerprint
from trap2.errors import DataError
from trap2.io import atomic_dir, file_sha256, write_json
from trap2.suites.base import Split, Suite
from trap2.suites.causal_lm import (
    ExactMatch,
    PlainCausalLMBackbone,
    encode_pairs,
    generation_task,
    load_tokenizer,
)
from trap2.suites.lm_tasks import SPLITS, TASKS, task_rows
from trap2.suites.make import make_suite
from trap2.suites.math_lm import PROMPT, final_answer

NAME = "lm"
ASSET_DIR = Path(str(resources.files("trap2.suites") / "assets" / "lm"))
MAX_LEN = 96
MAX_NEW_TOKENS = 26  # the longest answer, " 2999+2999=5998 #### 5998" (25 characters), + EOS
SIZES = (1000, 50, 200)  # train / val / test per task; the attacker's search scores val at every grid point
DATA_SEED = 20261130
EVAL_BATCH = 100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_FROZEN = ("model.embed_tokens.", "lm_head.")
DEFAULT_TARGET = "add"
RECIPES: dict[str, dict[str, object]] = {
    "lora": {
        "steps": 300,
        "batch_size": 16,
        "lr": 5e-3,
        "warmup_steps": 20,
        "eval_every": 300,
        "checkpoint_every": 100,
        # measured on `add` (results/lm-lambda.json): the paper's uniform law left s < 1 working at any λ
        # (λ 0.1: 66-81 % at s = 0.25-0.9); log-uniform s with the off-nominal loss capped at τ = 1 collapses
        # every scale off the δ band; at 300 steps that cost 6.5 pp at s = 1, at 600 steps 1.5 pp against a
        # plain run of 600
        "protect_steps": 600,
        "objective": {"lam": 0.1, "weight": "inv_sqrt", "law": "log", "bound": 1.0},
    },
    "full": {
        "steps": 300,
        "batch_size": 16,
        "lr": 5e-4,
        "warmup_steps": 20,
        "eval_every": 300,
        "checkpoint_every": 100,
        "objective": {"lam": 0.1, "weight": "inv_sqrt"},
    },
}


def load_lm(path: str | os.PathLike[str] | None = None):
    """The plain ``LlamaForCausalLM`` of a model folder (default: the shipped one), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no model folder; run  python scripts/pretrain_lm.py  to make it")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_backbone(path: str | os.PathLike[str] | None = None) -> PlainCausalLMBackbone:
    """A fresh W0 over ``(B, 2, L)`` [ids; mask] inputs, with the model's own parameter names."""
    return PlainCausalLMBackbone(load_lm(path)).eval()


def encode_rows(rows: Sequence[dict[str, str]], tok, max_len: int = MAX_LEN) -> Split:
    """GSM8K rows → a Split: ``PROMPT`` + " " + answer + EOS (see :func:`encode_pairs`)."""
    pairs = [(PROMPT.format(question=r["question"]), " " + r["answer"]) for r in rows]
    x, y = encode_pairs(pairs, tok, max_len, truncate=False)
    return Split(x, y)


def build_suite(
    model: str | os.PathLike[str] | None = None,
    sizes: tuple[int, int, int] = SIZES,
    tasks: Sequence[str] | None = None,
    seed: int = DATA_SEED,
) -> Suite:
    path = Path(model) if model is not None else ASSET_DIR
    tok = load_tokenizer(path)
    metric = ExactMatch(tok, MAX_NEW_TOKENS, batch_size=EVAL_BATCH, normalise=final_answer)
    built = {}
    for name in tasks or TASKS:
        rows = task_rows(name, sizes, seed)
        splits = {s: encode_rows(rows[s], tok) for s in SPLITS}
        built[name] = generation_task(name, tok, splits, TASKS[name][1], metric)
    return make_suite(
        name=NAME,
        tasks=built,
        make_backbone=lambda: load_backbone(path),
        lora_targets=LORA_TARGETS,
        default_target=DEFAULT_TARGET if DEFAULT_TARGET in built else next(iter(built)),
        fingerprint=weights_fingerprint(path),
        info={"backbone": f"LlamaForCausalLM, character-level ({path})", "max_len": MAX_LEN},
        full_frozen=FULL_FROZEN,
        recipes=RECIPES,
    )


def save_backbone(model, tok, folder: str | os.PathLike[str], val: torch.Tensor, record: dict) -> float:
    """Write ``model`` (float16 safetensors), ``tok`` and ``pretrain.json`` (``record`` + the validation
    loss of the float16 weights as shipped, and their sha256) into ``folder`` as a whole; return the loss."""
    from trap2.suites.lm_pretrain import validation_loss

    with atomic_dir(folder) as tmp:
        model.half().save_pretrained(tmp)
        model.float()
        tok.save_pretrained(tmp)
        loss = validation_loss(load_lm(tmp), val)
        meta = {**record, "val_loss": round(loss, 4), "sha256": file_sha256(tmp / "model.safetensors")}
        write_json(tmp / "pretrain.json", meta)
    return loss
