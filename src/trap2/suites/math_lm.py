"""Suite ``math``: the paper's LLM setting from local paths — a causal language model fine-tuned on
GSM8K-style question/answer data with the loss on the answer tokens only, scored by exact match of the
final answer in greedy generations.

Nothing is downloaded. Point the suite at local copies:

- ``$TRAP2_MATH_MODEL``: a folder that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load (e.g. a saved
  Llama-3.1-8B).
- ``$TRAP2_MATH_DATA``: ``<task>/train.jsonl`` and ``<task>/test.jsonl`` per task, one
  ``{"question": ..., "answer": ...}`` per line with the final answer after ``####`` (GSM8K's format).
  Every task folder is a task of the suite (e.g. gsm8k next to other skills to merge with).

Each example is ``PROMPT`` + answer + EOS, tokenised once into ``MAX_LEN`` tokens; targets are the next
tokens of the answer (the prompt and padding are ignored, -100). The "head" is a parameter-free view of
the LM's logits and the task's loss the cross-entropy over the answer tokens (per sample: the mean over
that sample's answer tokens), so every objective trains the answer tokens; full fine-tuning keeps the token
embeddings and the LM head at W0. Evaluation decodes greedily from the prompt and compares the number
after ``####`` with the reference.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from trap2.data.prepare import (
    TaskSource,
    data_dir,
    env_path,
    load_prepared,
    prepare_task,
    weights_fingerprint,
)
from trap2.errors import DataError
from trap2.suites.base import CrossEntropy, Split, Suite, Task

NAME = "math"
PROMPT = "Question: {question}\nAnswer:"
MAX_LEN = 384
MAX_NEW_TOKENS = 256
SIZES = (7000, 473, 1319)  # GSM8K: 7,473 train (val carved from it), 1,319 test
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_FROZEN = ("lm.model.embed_tokens.", "lm.lm_head.")
IGNORE = -100
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


def model_path() -> Path:
    return env_path(
        "TRAP2_MATH_MODEL",
        "the math suite reads a causal LM from a local folder that AutoModelForCausalLM.from_pretrained loads",
    )


def data_root() -> Path:
    return env_path("TRAP2_MATH_DATA", "the math suite reads <task>/{train,test}.jsonl (GSM8K format)")


def final_answer(text: str) -> str | None:
    """The number after ``####`` (commas dropped), or None."""
    m = _ANSWER.search(text)
    return None if m is None else m.group(1).replace(",", "").lstrip("+")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: missing (GSM8K-style JSONL expected)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{path}:{i}: needs a 'question' and an 'answer' string")
        if not isinstance(row.get("answer"), str) or final_answer(row["answer"]) is None:
            raise DataError(f"{path}:{i}: the answer must end with '#### <number>'")
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
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: no loadable tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no EOS token")
    return tok


def encode_examples(rows, tok, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows → x (N, 2, max_len) [ids; mask], right-padded, and y (N, max_len - 1): y[t] is the target
    for position t (the answer's next token), -100 on the prompt and padding."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.full((len(rows), 2, max_len), 0, dtype=torch.int64)
    x[:, 0] = pad
    y = torch.full((len(rows), max_len - 1), IGNORE, dtype=torch.int64)
    for i, row in enumerate(rows):
        prompt = tok(PROMPT.format(question=row["question"]), add_special_tokens=True)["input_ids"]
        answer = tok(" " + row["answer"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(prompt) + 1 > max_len:
            raise DataError(f"a prompt of {len(prompt)} tokens does not fit max_len={max_len}")
        ids = (prompt + answer)[:max_len]
        x[i, 0, : len(ids)] = torch.tensor(ids)
        x[i, 1, : len(ids)] = 1
        y[i, len(prompt) - 1 : len(ids) - 1] = torch.tensor(ids[len(prompt) :])
    return x, y


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


class CausalLMBackbone(nn.Module):
    """A causal LM over ``(B, 2, L)`` [ids; mask] inputs (left or right padding) → logits (B, L, V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits


class NextTokenHead(nn.Module):
    """Parameter-free: logits (B, L, V) → (B, V, L-1), the layout the task's ``CrossEntropy`` (and
    ``F.cross_entropy``) takes with (B, L-1) next-token targets."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1].transpose(1, 2)


@torch.no_grad()
def greedy_answers(
    backbone: nn.Module,
    prompts: list[list[int]],
    eos: int,
    pad: int,
    max_new_tokens: int,
    params: Mapping[str, torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (no KV cache: any parameter override works)."""
    device = next(backbone.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        x = torch.stack([ids, mask], dim=1)
        logits = (
            backbone(x) if params is None else functional_call(backbone, dict(params), (x,), strict=False)
        )
        nxt = logits[:, -1].argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            if int(nxt[i]) == eos:
                done[i] = True
            else:
                out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
    return out


class ExactMatch:
    """A task's metric: greedy answer vs reference, compared on the number after ``####``."""

    def __init__(self, tok, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16) -> None:
        self.tok = tok
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, backbone: nn.Module, split: Split, params: Mapping[str, torch.Tensor] | None) -> float:
        was_training = backbone.training
        backbone.eval()
        prompts, gold = [], []
        for x, y in zip(split.x, split.y, strict=True):
            answer = torch.nonzero(y != IGNORE).flatten()
            start = int(answer[0]) + 1  # y[t] is the target of position t: the answer starts at t + 1
            prompts.append(x[0, :start].tolist())
            gold.append(final_answer(self.tok.decode(x[0, start : start + len(answer)].tolist())))
        correct = 0
        for i in range(0, len(prompts), self.batch_size):
            outs = greedy_answers(
                backbone, prompts[i : i + self.batch_size], self.eos, self.pad, self.max_new_tokens, params
            )
            for o, g in zip(outs, gold[i : i + self.batch_size], strict=True):
                correct += int(g is not None and final_answer(self.tok.decode(o)) == g)
        backbone.train(was_training)
        return correct / max(1, len(prompts))


def load_backbone(path: Path) -> CausalLMBackbone:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a loadable causal LM ({e})") from None
    return CausalLMBackbone(lm).eval()


def build_suite(
    folder: Path | None = None,
    model: str | os.PathLike[str] | None = None,
    max_len: int = MAX_LEN,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Suite:
    path = Path(model) if model is not None else model_path()
    tok = tokenizer(path)
    metric = ExactMatch(tok, max_new_tokens)
    prepared = sorted(
        p.name.rsplit("-", 1)[0] for p in ((folder or data_dir()) / NAME).glob(f"*-{max_len}tok.safetensors")
    )
    if not prepared:
        raise DataError(f"{NAME} is not prepared: run  trap2 data prepare math")
    tasks = {}
    for name in prepared:
        tensors, meta = load_prepared(NAME, name, max_len, folder, "tok")
        splits = {s: Split(tensors[f"x_{s}"], tensors[f"y_{s}"]) for s in ("train", "val", "test")}
        tasks[name] = Task(
            name,
            len(tok),
            splits["train"],
            splits["val"],
            splits["test"],
            NextTokenHead(),
            meta["source"],
            metric,
            CrossEntropy(ignore_index=IGNORE),
        )
    return Suite(
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
