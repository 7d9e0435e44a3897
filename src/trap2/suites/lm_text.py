"""The ``lm`` suite's text side: its character-level tokenizer, its model shape, and the general
pretraining mixture the shipped backbone was trained on (``scripts/pretrain_lm.py``).

The tokenizer is one token per character (``\\n`` and printable ASCII) plus ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>``, built with the ``tokenizers`` library and saved as a standard
``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it offline; it prepends ``<bos>``.

The mixture (each pretraining sequence is ``<bos>`` + ``SEQ_LEN - 1`` tokens):

- synthetic lines packed one after another (``\\n``-separated), in compact symbolic formats:
  ``347+582=929``, ``58-347=-289``, ``47*86=4042``, ``347%9=5``, ``rev(kqzbt)=tbzqk``,
  ``sort(dbca)=abcd``;
- windows of English text: the inputs of BIG-bench tasks (read from its sdist, like the
  ``text-transformer`` suite), documents separated by ``<eos>``;
- question/answer examples in the fine-tuning tasks' format (``Question: What is 347 minus 58?\nAnswer:
  347-58=289 #### 289``, each followed by ``<eos>``, :data:`QA_FAMILIES`): task families the suite does
  not fine-tune on (subtraction, remainders, first/last letter, length, capitals, copying, the larger
  number) and the suite's skills asked in other words (``Add 347 and 582.``, ``Reverse kqzbt.``), never
  the suite's own wordings. The backbone follows the format and has the skills, as an instruction-tuned
  LLM does, so a task's adapter is a small change (a new wording mapped onto a skill), not the format and
  the skill learnt from scratch: such adapters conflict, and do not merge (docs/results-lm.md).

Every batch is a pure function of (seed, step), so a run resumed from a checkpoint draws the same data as
an uninterrupted one.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Mapping, Sequence
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


def _qa_subtract(rng: np.random.Generator) -> tuple[str, str, str]:
    a = int(rng.integers(100, 1000))
    b = int(rng.integers(10, a + 1))
    return f"What is {a} minus {b}?", f"{a}-{b}={a - b}", str(a - b)


def _qa_remainder(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = int(rng.integers(100, 10000)), int(rng.integers(2, 13))
    return f"What is the remainder when {a} is divided by {b}?", f"{a}%{b}={a % b}", str(a % b)


def _qa_larger(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = (int(x) for x in rng.choice(10000, 2, replace=False))
    return f"Which is larger, {a} or {b}?", "", str(max(a, b))


def _qa_first(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 3, 8)
    return f"What is the first letter of {w}?", "", w[0]


def _qa_last(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 3, 8)
    return f"What is the last letter of {w}?", "", w[-1]


def _qa_length(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 2, 9)
    return f"How many letters are in {w}?", "", str(len(w))


def _qa_capitals(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 3, 7)
    return f"Write {w} in capital letters.", "", w.upper()


def _qa_copy(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 3, 7)
    return f"Copy {w}.", "", w


# the suite's skills asked in other words (its tasks' wordings never occur in the mixture): an adapter maps
# a new wording onto a skill the backbone has in the format, as a task adapter of an instruction-tuned LLM
def _qa_add(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = int(rng.integers(100, 1000)), int(rng.integers(100, 1000))
    return f"Add {a} and {b}.", f"{a}+{b}={a + b}", str(a + b)


def _qa_self(rng: np.random.Generator) -> tuple[str, str, str]:
    a = int(rng.integers(100, 3000))
    return f"Add {a} to itself.", f"{a}+{a}={2 * a}", str(2 * a)


def _qa_multiply(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = int(rng.integers(10, 300)), int(rng.integers(2, 10))
    return f"Multiply {a} by {b}.", f"{a}*{b}={a * b}", str(a * b)


def _qa_increment(rng: np.random.Generator) -> tuple[str, str, str]:
    a = int(rng.integers(100, 9999))
    return f"Add one to {a}.", f"{a}+1={a + 1}", str(a + 1)


def _qa_reverse(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _word(rng, 4, 6)
    return f"Reverse {w}.", "", w[::-1]


def _qa_sort(rng: np.random.Generator) -> tuple[str, str, str]:
    w = "".join(rng.choice(list(LETTERS), int(rng.integers(4, 7)), replace=False))
    return f"Sort {w}.", "", "".join(sorted(w))


# the question/answer part of the mixture, in the tasks' format: task families the suite does not
# fine-tune on, and the suite's skills in other words
QA_FAMILIES: dict[str, Callable[[np.random.Generator], tuple[str, str, str]]] = {
    "subtract": _qa_subtract,
    "remainder": _qa_remainder,
    "larger": _qa_larger,
    "first": _qa_first,
    "last": _qa_last,
    "length": _qa_length,
    "capitals": _qa_capitals,
    "copy": _qa_copy,
    "add": _qa_add,
    "self": _qa_self,
    "multiply": _qa_multiply,
    "increment": _qa_increment,
    "reverse": _qa_reverse,
    "sort": _qa_sort,
}


def qa_example(rng: np.random.Generator) -> str:
    """One question/answer example of :data:`QA_FAMILIES` as the suite encodes its tasks' examples:
    ``Question: {question}\\nAnswer: {work} #### {value}`` (the ``<eos>`` after it is the caller's)."""
    from trap2.suites.lm_tasks import answer_text
    from trap2.suites.math_lm import PROMPT

    families = list(QA_FAMILIES.values())
    question, work, value = families[int(rng.integers(len(families)))](rng)
    return PROMPT.format(question=question) + " " + answer_text(value, work)


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
    """Pretraining sequences ``(B, SEQ_LEN)`` of token ids: a window of the English stream (documents
    joined by ``<eos>``) with probability ``english_share``, question/answer examples (each followed by
    ``<eos>``) with probability ``qa_share``, else synthetic lines."""

    def __init__(
        self,
        tok,
        english: Sequence[str],
        english_share: float,
        seed: int,
        seq_len: int = SEQ_LEN,
        qa_share: float = 0.0,
    ) -> None:
        if english_share > 0 and not english:
            raise DataError("the mixture has an English share but no English documents")
        if not (qa_share >= 0 and english_share + qa_share <= 1):
            raise DataError(f"the mixture's shares must be >= 0 and sum to <= 1: english {english_share}, "
                            f"qa {qa_share}")  # fmt: skip
        self.tok, self.seed, self.seq_len = tok, seed, seq_len
        self.english_share, self.qa_share = english_share, qa_share
        self.table = np.full(256, self.tok.unk_token_id, np.int64)
        for c in CHARS:
            self.table[ord(c)] = self.tok.convert_tokens_to_ids(c)
        self.table[0] = self.tok.eos_token_id  # the document separator below
        train = [d for i, d in enumerate(english) if i % VAL_EVERY]
        val = [d for i, d in enumerate(english) if i % VAL_EVERY == 0]
        self.streams = {"train": self._stream(train), "val": self._stream(val)}

    def _encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, ``\\0`` as ``<eos>`` (the tokenizer is one token per character, and this is
        what it gives, 1,000× faster)."""
        return self.table[np.frombuffer(text.encode("ascii", "replace"), np.uint8)]

    def _stream(self, docs: Sequence[str]) -> np.ndarray:
        """The documents' token ids, each followed by ``<eos>``."""
        return self._encode("\0".join(docs) + "\0") if docs else np.zeros(0, np.int64)

    def _rows(self, rng: np.random.Generator, n: int, stream: np.ndarray) -> torch.Tensor:
        body = self.seq_len - 1
        rows = np.empty((n, self.seq_len), np.int64)
        rows[:, 0] = self.tok.bos_token_id
        kind = rng.random(n)  # < english_share: English; then qa_share: question/answer; else synthetic
        for i in range(n):
            if kind[i] < self.english_share and len(stream) > body:
                start = int(rng.integers(0, len(stream) - body))
                rows[i, 1:] = stream[start : start + body]
            elif self.english_share <= kind[i] < self.english_share + self.qa_share:
                text = ""
                while len(text) < body:
                    text += qa_example(rng) + "\0"
                rows[i, 1:] = self._encode(text[:body])
            else:
                rows[i, 1:] = self._encode(synthetic_text(rng, body)[:body])
        return torch.from_numpy(rows)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The training batch of ``step`` (the same for a given seed, whatever ran before)."""
        return self._rows(np.random.default_rng([self.seed, step]), batch_size, self.streams["train"])

    def validation(self, n: int) -> torch.Tensor:
        """A fixed validation set: held-out English documents, fresh question/answer examples and fresh
        synthetic lines."""
        return self._rows(np.random.default_rng([self.seed, 1 << 40]), n, self.streams["val"])
