"""Suite ``math``: the paper's LLM setting from local paths — a causal language model fine-tuned on
GSM8K-style question/answer data with the loss on the answer tokens only, scored by exact match of the
final answer in greedy generations.

Nothing is downloaded. Point the suite at local copies:

- ``$TRAP2_MATH_MODEL``: a folder that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load (e.g. a saved
  Llama-3.1-8B).
- ``$TRAP2_MATH_DATA``: ``<task>/train.jsonl`` and ``<task>/test.jsonl`` per task, one
  ``{"question": ..., "answer": ...}`` per line with the final answer after ``####`` (GSM8K's format: a
  number, or a short text such as ``#### tbzqk``).
  Every task folder is a task of the suite (e.g. gsm8k next to other skills to merge with).

Each example is ``PROMPT`` + answer + EOS, tokenised once into ``MAX_LEN`` tokens; targets are the next
tokens of the answer (the prompt and padding are ignored, -100). The "head" is a parameter-free view of
the LM's logits and the task's loss the cross-entropy over the answer tokens (per sample: the mean over
that sample's answer tokens), so every objective trains the answer tokens; full fine-tuning keeps the token
embeddings and the LM head at W0. Evaluation decodes greedily from the prompt and compares the number
after ``####`` with the reference. The encoding, backbone and metric are :mod:`trap2.suites.causal_lm`'s,
shared with the files suite for causal LMs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from trap2.data.files import jsonl_values
from trap2.data.prepare import (
    TaskSource,
    data_dir,
    env_path,
    load_prepared,
    prepare_task,
    weights_fingerprint,
)
from trap2.errors import DataError
from trap2.suites.base import Split, Suite
from trap2.suites.causal_lm import (
    CausalLMBackbone,
    ExactMatch,
    encode_pairs,
    generation_task,
    load_causal_lm,
    load_tokenizer,
)
from trap2.suites.make import make_suite

NAME = "math"
PROMPT = "Question: {question}\nAnswer:"
MAX_LEN = 384
MAX_NEW_TOKENS = 256
SIZES = (7000, 473, 1319)  # GSM8K: 7,473 train (val carved from it), 1,319 test
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_FROZEN = ("lm.model.embed_tokens.", "lm.lm_head.")
# the paper's Llama recipe (λ 1e-3, w = 1/√s); a GPU run
RECIPES: dict[str, dict[str, object]] = {
    "lora": {
        "steps": 1000,
        "batch_size": 16,
        "lr": 2e-4,
        "objective": {"lam": 1e-3, "weight": "inv_sqrt"},
        "checkpoint_every": 100,
        "device": "auto",
    },
    "full": {
        "steps": 1000,
        "batch_size": 16,
        "lr": 1e-5,
        "objective": {"lam": 5e-3, "weight": "inv_sqrt"},
        "checkpoint_every": 100,
        "device": "auto",
    },
}
_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")
_MARKED = re.compile(r"####[ \t]*(\S[^\n]*)")


def model_path() -> Path:
    return env_path(
        "TRAP2_MATH_MODEL",
        "the math suite reads a causal LM from a local folder that AutoModelForCausalLM.from_pretrained loads",
    )


def data_root() -> Path:
    return env_path("TRAP2_MATH_DATA", "the math suite reads <task>/{train,test}.jsonl (GSM8K format)")


def final_answer(text: str) -> str | None:
    """The number after ``####`` (commas dropped); else the short text after ``####`` up to the line's
    end, stripped (e.g. ``#### tbzqk``); None without either."""
    m = _ANSWER.search(text)
    if m is not None:
        return m.group(1).replace(",", "").lstrip("+")
    m = _MARKED.search(text)
    return None if m is None else m.group(1).strip()


def read_jsonl(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: missing (GSM8K-style JSONL expected)")
    rows = []
    for at, row in jsonl_values(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{at}: needs a 'question' and an 'answer' string")
        if not isinstance(row.get("answer"), str) or final_answer(row["answer"]) is None:
            raise DataError(f"{at}: the answer must end with '#### <number>' (or '#### <short text>')")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def task_names(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    names = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())
    if not names:
        raise DataError(f"{root}: no <task>/train.jsonl inside")
    return names


def task_source(name: str, root: Path) -> TaskSource:
    def load() -> dict:
        train, test = read_jsonl(root / name / "train.jsonl"), read_jsonl(root / name / "test.jsonl")
        as_arrays = [
            (np.asarray(rows, dtype=object), np.zeros(len(rows), np.int64)) for rows in (train, test)
        ]
        return {"train": as_arrays[0], "test": as_arrays[1]}

    return TaskSource(name, load, *SIZES, f"{name} (JSONL at {root / name})")


def tokenizer(path: Path):
    return load_tokenizer(path)


def encode_examples(rows, tok, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GSM8K rows → x (N, 2, max_len) [ids; mask] and y (N, max_len - 1) (see
    :func:`trap2.suites.causal_lm.encode_pairs`): ``PROMPT`` + " " + answer + EOS, the answer cut at
    ``max_len``."""
    pairs = [(PROMPT.format(question=row["question"]), " " + row["answer"].strip()) for row in rows]
    return encode_pairs(pairs, tok, max_len)


def prepare(
    root: str | os.PathLike[str] | None = None,
    folder: Path | None = None,
    model: str | os.PathLike[str] | None = None,
    max_len: int = MAX_LEN,
) -> list[Path]:
    root = Path(root) if root is not None else data_root()
    tok = tokenizer(Path(model) if model is not None else model_path())
    return [
        prepare_task(
            NAME, task_source(t, root), max_len, folder, lambda r: encode_examples(r, tok, max_len), "tok"
        )
        for t in task_names(root)
    ]


def load_backbone(path: Path) -> CausalLMBackbone:
    return load_causal_lm(path)


def build_suite(
    folder: Path | None = None,
    model: str | os.PathLike[str] | None = None,
    max_len: int = MAX_LEN,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Suite:
    path = Path(model) if model is not None else model_path()
    tok = tokenizer(path)
    metric = ExactMatch(tok, max_new_tokens, normalise=final_answer)
    prepared = sorted(
        p.name.rsplit("-", 1)[0] for p in ((folder or data_dir()) / NAME).glob(f"*-{max_len}tok.safetensors")
    )
    if not prepared:
        raise DataError(f"{NAME} is not prepared: run  trap2 data prepare math")
    tasks = {}
    for name in prepared:
        tensors, meta = load_prepared(NAME, name, max_len, folder, "tok")
        splits = {s: Split(tensors[f"x_{s}"], tensors[f"y_{s}"]) for s in ("train", "val", "test")}
        tasks[name] = generation_task(name, tok, splits, meta["source"], metric)
    return make_suite(
        name=NAME,
        tasks=tasks,
        make_backbone=lambda: load_backbone(path),
        lora_targets=LORA_TARGETS,
        default_target="gsm8k" if "gsm8k" in tasks else prepared[0],
        fingerprint=weights_fingerprint(path),
        info={"backbone": f"causal LM ({path})", "max_len": max_len},
        full_frozen=FULL_FROZEN,
        recipes=RECIPES,
    )
