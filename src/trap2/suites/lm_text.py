"""The ``lm`` suite's text side: its character-level tokenizer, its model shape, and the general
pretraining mixture the shipped backbone was trained on (``scripts/pretrain_lm.py``).

The tokenizer is one token per character (``\\n`` and printable ASCII) plus ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>``, built with the ``tokenizers`` library and saved as a standard
``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it offline; it prepends ``<bos>``.

The mixture (each pretraining sequence is ``<bos>`` + ``SEQ_LEN - 1`` tokens):

- synthetic lines packed one after another (``\\n``-separated), in compact symbolic formats only:
  ``347+582=929``, ``58-347=-289``, ``47*86=4042``, ``347%9=5``, ``rev(kqzbt)=tbzqk``,
  ``sort(dbca)=abcd``; the fine-tuning tasks' question/answer format (``Question: … Answer: #### …``,
  words, ``####``) never occurs in it;
- windows of English text: the inputs of BIG-bench tasks (read from its sdist, like the
  ``text-transformer`` suite), documents separated by ``<eos>``.

Every batch is a pure function of (seed, step), so a run resumed from a checkpoint draws the same data as
an uninterrupted one.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from trap2.errors import DataError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
SEQ_LEN = 96
# LlamaForCausalLM: ~1.3 M parameters (6 blocks of width 128, SwiGLU 384, 4 heads)
MODEL_SHAPE: dict[str, object] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
# BIG-bench tasks whose inputs are the English part of the mixture (the text-transformer suite's tasks)
ENGLISH_TASKS = (
    "multiemo/all_sentence_en",
    "natural_instructions/subtask046_miscellaenous_question_typing",
    "hyperbaton",
    "fact_checker/fever",
    "epistemic_reasoning",
    "logical_fallacy_detection",
    "vitaminc_fact_verification",
    "winowhy",
)
VAL_EVERY = 20  # every 20th English document is held out for the validation loss
LETTERS = string.ascii_lowercase


def make_tokenizer():
    """The character-level tokenizer (a ``PreTrainedTokenizerFast``; ``<bos>`` prepended)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per character
    core.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def model_config(tok, shape: Mapping[str, object] | None = None):
    """The backbone's ``LlamaConfig`` for ``tok``'s vocabulary (``shape``: ``MODEL_SHAPE`` overrides)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**MODEL_SHAPE, **(shape or {})},
    )


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(rng.choice(list(LETTERS), int(rng.integers(lo, hi + 1))))


def _number(rng: np.random.Generator, max_digits: int) -> int:
    return int(rng.integers(0, 10 ** int(rng.integers(1, max_digits + 1))))


def synthetic_line(rng: np.random.Generator) -> str:
    """One line of the symbolic part of the mixture (an equation or a string operation)."""
    kind = int(rng.integers(6))
    if kind == 0:
        a, b = _number(rng, 4), _number(rng, 4)
        return f"{a}+{b}={a + b}"
    if kind == 1:
        a, b = _number(rng, 4), _number(rng, 4)
        return f"{a}-{b}={a - b}"
    if kind == 2:
        a, b = _number(rng, 3), _number(rng, 2)
        return f"{a}*{b}={a * b}"
    if kind == 3:
        a, b = _number(rng, 4), int(rng.integers(2, 13))
        return f"{a}%{b}={a % b}"
    w = _word(rng, 2, 9)
    return f"rev({w})={w[::-1]}" if kind == 4 else f"sort({w})={''.join(sorted(w))}"


def synthetic_text(rng: np.random.Generator, n_chars: int) -> str:
    """Synthetic lines, ``\\n``-separated, at least ``n_chars`` long."""
    lines: list[str] = []
    while sum(len(s) + 1 for s in lines) < n_chars:
        lines.append(synthetic_line(rng))
    return "\n".join(lines) + "\n"


def english_documents(bigbench: str | os.PathLike[str] | None = None) -> list[str]:
    """The English documents of the mixture: every input of ``ENGLISH_TASKS`` (whitespace collapsed,
    ASCII only), in a fixed order."""
    from trap2.data.prepare import bigbench_source
    from trap2.data.sources import bigbench_examples, read_bigbench

    source = Path(bigbench) if bigbench is not None else bigbench_source()
    raw = read_bigbench(source, list(ENGLISH_TASKS))
    docs = []
    for name in ENGLISH_TASKS:
        for e in bigbench_examples(raw[name], f"{source}:{name}"):
            text = e.get("input")
            if isinstance(text, str):
                text = " ".join(text.encode("ascii", "ignore").decode().split())
                if len(text) >= 20:
                    docs.append(text)
    if not docs:
        raise DataError(f"{source}: no English inputs in {', '.join(ENGLISH_TASKS)}")
    return docs


class Mixture:
    """Pretraining sequences ``(B, SEQ_LEN)`` of token ids: synthetic lines with probability
    ``1 - english_share``, else a window of the English stream (documents joined by ``<eos>``)."""

    def __init__(
        self, tok, english: Sequence[str], english_share: float, seed: int, seq_len: int = SEQ_LEN
    ) -> None:
        if english_share > 0 and not english:
            raise DataError("the mixture has an English share but no English documents")
        self.tok, self.seed, self.seq_len, self.english_share = tok, seed, seq_len, english_share
        train = [d for i, d in enumerate(english) if i % VAL_EVERY]
        val = [d for i, d in enumerate(english) if i % VAL_EVERY == 0]
        self.streams = {"train": self._stream(train), "val": self._stream(val)}

    def _stream(self, docs: Sequence[str]) -> np.ndarray:
        """The documents' token ids, each followed by ``<eos>`` (characters mapped through a table: the
        tokenizer is one token per character, and this is what it gives, 1,000× faster)."""
        if not docs:
            return np.zeros(0, np.int64)
        table = np.full(256, self.tok.unk_token_id, np.int64)
        for c in CHARS:
            table[ord(c)] = self.tok.convert_tokens_to_ids(c)
        table[0] = self.tok.eos_token_id  # the separator below
        text = "\0".join(docs) + "\0"
        return table[np.frombuffer(text.encode("ascii", "replace"), np.uint8)]

    def _rows(self, rng: np.random.Generator, n: int, stream: np.ndarray) -> torch.Tensor:
        body = self.seq_len - 1
        rows = np.empty((n, self.seq_len), np.int64)
        rows[:, 0] = self.tok.bos_token_id
        english = rng.random(n) < self.english_share
        for i in range(n):
            if english[i] and len(stream) > body:
                start = int(rng.integers(0, len(stream) - body))
                rows[i, 1:] = stream[start : start + body]
            else:
                text = synthetic_text(rng, body)
                rows[i, 1:] = self.tok(text, add_special_tokens=False)["input_ids"][:body]
        return torch.from_numpy(rows)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The training batch of ``step`` (the same for a given seed, whatever ran before)."""
        return self._rows(np.random.default_rng([self.seed, step]), batch_size, self.streams["train"])

    def validation(self, n: int) -> torch.Tensor:
        """A fixed validation set: held-out English documents and fresh synthetic lines."""
        return self._rows(np.random.default_rng([self.seed, 1 << 40]), n, self.streams["val"])
