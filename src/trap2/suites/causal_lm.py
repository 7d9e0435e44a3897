"""Causal-LM plumbing shared by the ``math`` suite and the files suite for causal LMs
(:mod:`trap2.suites.files_lm`): prompt/answer encoding with the loss on the answer tokens only, the
backbone and its parameter-free next-token "head", and the two metrics — exact match of a greedy
generation and multiple-choice accuracy by answer log-likelihood.

Encoding: the prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the answer without them
and followed by EOS; the two are concatenated as written. Inputs are ``(N, 2, L)`` [ids; mask], right
padded; targets ``(N, L - 1)``: ``y[t]`` is the token after position ``t`` on the answer (and its EOS),
``IGNORE`` (-100) on the prompt and the padding.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trap2.errors import DataError
from trap2.suites.base import CrossEntropy, Split, Task

IGNORE = -100


def load_tokenizer(path: Path):
    """The tokenizer of a local model folder; it must have an EOS token (the answer's end)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: no loadable tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no EOS token")
    return tok


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def answer_ids(tok, answer: str) -> list[int]:
    """The answer's tokens as trained and scored: its text without special tokens, then EOS."""
    return tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def encode_pairs(
    pairs: Sequence[tuple[str, str]],
    tok,
    max_len: int,
    where: Sequence[str] | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) texts → x (N, 2, max_len) [ids; mask], right-padded, and y (N, max_len - 1): y[t]
    is the target for position t (the answer's next token), -100 on the prompt and padding.

    ``where`` names each pair in errors (e.g. ``file:line``). A prompt that leaves no room for the answer
    is refused; a longer answer is cut at ``max_len`` when ``truncate``, else refused."""
    x = torch.zeros((len(pairs), 2, max_len), dtype=torch.int64)
    x[:, 0] = pad_id(tok)
    y = torch.full((len(pairs), max_len - 1), IGNORE, dtype=torch.int64)
    for i, (prompt_text, answer_text) in enumerate(pairs):
        at = f"{where[i]}: " if where is not None else ""
        prompt = tok(prompt_text, add_special_tokens=True)["input_ids"]
        answer = answer_ids(tok, answer_text)
        if not prompt:  # the first answer token needs a position before it
            raise DataError(f"{at}the prompt has no tokens (this tokenizer adds no BOS): give a prompt")
        if len(prompt) + 1 > max_len:
            raise DataError(f"{at}a prompt of {len(prompt)} tokens does not fit max_len={max_len}")
        if not truncate and len(prompt) + len(answer) > max_len:
            raise DataError(
                f"{at}prompt + answer + EOS is {len(prompt) + len(answer)} tokens, over max_len={max_len}; "
                "raise max_len"
            )
        ids = (prompt + answer)[:max_len]
        x[i, 0, : len(ids)] = torch.tensor(ids)
        x[i, 1, : len(ids)] = 1
        y[i, len(prompt) - 1 : len(ids) - 1] = torch.tensor(ids[len(prompt) :])
    return x, y


def prompt_and_answer(x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list[int]]:
    """One encoded example (x (2, L), y (L - 1,)) → its prompt ids and its answer ids (EOS included)."""
    answer = torch.nonzero(y != IGNORE).flatten()
    start = int(answer[0]) + 1  # y[t] is the target of position t: the answer starts at t + 1
    return x[0, :start].tolist(), x[0, start : start + len(answer)].tolist()


def causal_logits(lm: nn.Module, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """``(B, 2, L)`` [ids; mask] (left or right padding) → logits (B, L, V); positions count real tokens.

    With a transformers ``Cache`` holding the keys and values of the first P positions, only positions
    P.. are run (the mask still covers all L) and their logits (B, L - P, V) returned; the cache is
    extended in place."""
    ids, mask = x[:, 0], x[:, 1]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    if cache is None:
        return lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    past = cache.get_seq_length()
    kwargs = {_cache_argument(type(lm)): cache}
    return lm(
        input_ids=ids[:, past:],
        attention_mask=mask,
        position_ids=positions[:, past:],
        use_cache=True,
        **kwargs,
    ).logits


@functools.cache
def _cache_argument(cls: type) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class CausalLMBackbone(nn.Module):
    """A causal LM over ``(B, 2, L)`` [ids; mask] inputs → logits (B, L, V); parameters under ``lm.``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        return causal_logits(self.lm, x, cache)


class PlainCausalLMBackbone(nn.Module):
    """A causal LM over ``(B, 2, L)`` [ids; mask] inputs → logits (B, L, V) whose parameter names are the
    transformers model's own (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``): it holds
    the model's children directly, so an adapter trained with PEFT on the plain model applies by name."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        for name, p in lm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in lm.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.__dict__["_lm"] = lm  # not a submodule: its children are this module's own

    def train(self, mode: bool = True) -> PlainCausalLMBackbone:
        super().train(mode)
        self._lm.training = mode
        return self

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        return causal_logits(self._lm, x, cache)


class NextTokenHead(nn.Module):
    """Parameter-free: logits (B, L, V) → (B, V, L-1), the layout the task's ``CrossEntropy`` (and
    ``F.cross_entropy``) takes with (B, L-1) next-token targets."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1].transpose(1, 2)


def generation_task(name: str, tok, splits: Mapping[str, Split], description: str, metric: Any) -> Task:
    """A causal-LM task: the parameter-free next-token head, the loss on the answer tokens (the prompt and
    padding ignored), splits ``train``/``val``/``test`` as :func:`encode_pairs` makes them."""
    return Task(
        name,
        len(tok),
        splits["train"],
        splits["val"],
        splits["test"],
        NextTokenHead(),
        description,
        metric,
        CrossEntropy(ignore_index=IGNORE),
    )


def load_causal_lm(path: Path, plain_names: bool = False) -> nn.Module:
    """W0 from a local folder, in eval mode: a :class:`CausalLMBackbone`, or with ``plain_names`` a
    :class:`PlainCausalLMBackbone`."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a loadable causal LM ({e})") from None
    return (PlainCausalLMBackbone(lm) if plain_names else CausalLMBackbone(lm)).eval()


def _on_device(backbone: nn.Module, params: Mapping[str, torch.Tensor] | None) -> tuple[torch.device, dict]:
    first = next(iter(backbone.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    return device, {n: p.to(device) for n, p in (params or {}).items()}


def _logits(
    backbone: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor], cache: Any = None
) -> torch.Tensor:
    kwargs = {} if cache is None else {"cache": cache}
    return (
        backbone(x, **kwargs) if not params else functional_call(backbone, params, (x,), kwargs, strict=False)
    )


def _new_cache(backbone: nn.Module) -> Any:
    """An empty key/value cache when the backbone (or the one a PEFT model wraps) is one of ours, which
    take it; else None (every step recomputes the whole sequence)."""
    core = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if not isinstance(core, (CausalLMBackbone, PlainCausalLMBackbone)):
        return None
    from transformers import DynamicCache

    return DynamicCache()


@torch.no_grad()
def greedy_answers(
    backbone: nn.Module,
    prompts: list[list[int]],
    eos: int,
    pad: int,
    max_new_tokens: int,
    params: Mapping[str, torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts. Parameter overrides go through ``functional_call``;
    our backbones keep a key/value cache (each step runs the new token only), others recompute."""
    device, params = _on_device(backbone, params)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    cache = _new_cache(backbone)
    for _ in range(max_new_tokens):
        logits = _logits(backbone, torch.stack([ids, mask], dim=1), params, cache)
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
    """A task's metric: the greedy answer to each prompt vs the reference, both decoded (special tokens
    dropped) and compared after ``normalise`` (``None`` never matches): math's number after ``####``,
    or the stripped text."""

    def __init__(
        self,
        tok,
        max_new_tokens: int,
        batch_size: int = 16,
        normalise: Callable[[str], str | None] = str.strip,
    ) -> None:
        self.tok = tok
        self.eos = tok.eos_token_id
        self.pad = pad_id(tok)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.normalise = normalise

    def __call__(self, backbone: nn.Module, split: Split, params: Mapping[str, torch.Tensor] | None) -> float:
        was_training = backbone.training
        backbone.eval()
        prompts, gold = [], []
        for x, y in zip(split.x, split.y, strict=True):
            prompt, answer = prompt_and_answer(x, y)
            prompts.append(prompt)
            gold.append(self.normalise(self.tok.decode(answer, skip_special_tokens=True)))
        correct = 0
        for i in range(0, len(prompts), self.batch_size):
            outs = greedy_answers(
                backbone, prompts[i : i + self.batch_size], self.eos, self.pad, self.max_new_tokens, params
            )
            for o, g in zip(outs, gold[i : i + self.batch_size], strict=True):
                correct += int(
                    g is not None and self.normalise(self.tok.decode(o, skip_special_tokens=True)) == g
                )
        backbone.train(was_training)
        return correct / max(1, len(prompts))


@torch.no_grad()
def answer_logliks(
    backbone: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad: int,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n,) float64: Σ_t log p(answer_t | prompt, answer_<t) of each (prompt, answer) pair, in one
    right-padded batch."""
    device, params = _on_device(backbone, params)
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    x = torch.zeros((len(prompts), 2, width), dtype=torch.int64)
    x[:, 0] = pad
    y = torch.full((len(prompts), width - 1), IGNORE, dtype=torch.int64)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        x[i, 0, : len(p) + len(a)] = torch.tensor([*p, *a])
        x[i, 1, : len(p) + len(a)] = 1
        y[i, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
    logits = _logits(backbone, x.to(device), params)[:, :-1].float()  # (n, width - 1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), ignore_index=IGNORE, reduction="none")
    return -nll.double().sum(1).cpu()  # ignored targets give 0


class AnswerChoice:
    """A task's metric: multiple-choice accuracy. Each example's gold answer competes with every
    candidate (the task's distinct answers, as token ids with EOS); it is right when its total answer
    log-likelihood is strictly the highest. ``batch_size`` counts (prompt, candidate) sequences."""

    def __init__(self, candidates: Sequence[Sequence[int]], pad: int, batch_size: int = 16) -> None:
        self.candidates = [tuple(c) for c in candidates]
        self.index = {c: k for k, c in enumerate(self.candidates)}
        if len(self.index) != len(self.candidates):
            raise DataError("answer candidates: two candidates have the same tokens")
        self.pad = pad
        self.batch_size = batch_size

    def logliks(
        self, backbone: nn.Module, split: Split, params: Mapping[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) log-likelihoods of every candidate after every prompt, and (N,) gold candidate indices."""
        prompts, gold = [], []
        for x, y in zip(split.x, split.y, strict=True):
            prompt, answer = prompt_and_answer(x, y)
            if tuple(answer) not in self.index:
                raise DataError("an example's answer is not among the task's answer candidates")
            prompts.append(prompt)
            gold.append(self.index[tuple(answer)])
        pairs = [(p, c) for p in prompts for c in self.candidates]  # example-major: row i*K + k
        was_training = backbone.training
        backbone.eval()
        scores = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            scores.append(
                answer_logliks(backbone, [p for p, _ in chunk], [c for _, c in chunk], self.pad, params)
            )
        backbone.train(was_training)
        return torch.cat(scores).view(len(prompts), len(self.candidates)), torch.tensor(gold)

    def __call__(self, backbone: nn.Module, split: Split, params: Mapping[str, torch.Tensor] | None) -> float:
        if len(split) == 0:
            return 0.0
        ll, gold = self.logliks(backbone, split, params)
        best = ll.gather(1, gold[:, None]).squeeze(1)
        others = ll.scatter(1, gold[:, None], float("-inf")).amax(1)  # the best wrong candidate
        return float((best > others).double().mean())
