"""The ``lm`` suite's generation tasks, as GSM8K-format rows (``question``; ``answer`` ending in
``#### <value>``), drawn from a seeded generator: each task is a function ``rng -> (question, work, value)``.

The questions are short English prompts; the pretraining mixture holds the same operations only in
compact symbolic form (``347+582=929``, ``rev(abc)=cba``), never this format, so a task's zero-shot exact
match is near 0 and its fine-tuning teaches the format and the skill's wording. As in GSM8K, an
arithmetic answer carries its worked step before the final value (``745+195=940 #### 940``, GSM8K's
``<<745+195=940>>`` without the brackets): the adapter learns to turn the wording into the equation, and
the backbone's pretrained arithmetic computes it. The string tasks answer directly. docs/suites.md has
the formats and tasks that did not train.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trap2.errors import ConfigError
from trap2.io import atomic_path

Generator = Callable[[np.random.Generator], tuple[str, str, str]]  # rng -> (question, work, value)


def _int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _letters(rng: np.random.Generator, lo: int, hi: int, distinct: bool = False) -> str:
    n = _int(rng, lo, hi)
    return "".join(rng.choice(list(string.ascii_lowercase), n, replace=not distinct))


def add(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = _int(rng, 100, 999), _int(rng, 100, 999)
    return f"What is {a} plus {b}?", f"{a}+{b}={a + b}", str(a + b)


def double(rng: np.random.Generator) -> tuple[str, str, str]:
    a = _int(rng, 100, 2999)
    return f"What is twice {a}?", f"{a}+{a}={2 * a}", str(2 * a)


def multiply(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = _int(rng, 10, 299), _int(rng, 2, 9)  # 2,320 questions: the suite draws 1,250 distinct
    return f"What is {a} times {b}?", f"{a}*{b}={a * b}", str(a * b)


def successor(rng: np.random.Generator) -> tuple[str, str, str]:
    a = _int(rng, 100, 9998)
    return f"What number comes after {a}?", f"{a}+1={a + 1}", str(a + 1)


def reverse(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _letters(rng, 4, 6)
    return f"Write {w} backwards.", "", w[::-1]


def sort_letters(rng: np.random.Generator) -> tuple[str, str, str]:
    w = _letters(rng, 4, 6, distinct=True)
    return f"Put the letters of {w} in order.", "", "".join(sorted(w))


# name: (generator, description)
TASKS: dict[str, tuple[Generator, str]] = {
    "add": (add, "sum of two 3-digit numbers"),
    "double": (double, "twice a number from 100 to 2999"),
    "multiply": (multiply, "a number from 10 to 299 times a 1-digit number"),
    "next": (successor, "the number after a 3-4 digit number"),
    "reverse": (reverse, "a 4-6 letter random string backwards"),
    "sort": (sort_letters, "the distinct letters of a 4-6 letter string in alphabetical order"),
}
SPLITS = ("train", "val", "test")


def answer_text(value: str, work: str = "") -> str:
    """GSM8K's answer: the worked step (if any), then ``#### <value>``."""
    return f"{work} #### {value}" if work else f"#### {value}"


def task_rows(name: str, sizes: tuple[int, int, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """{split: rows}: ``sizes`` distinct questions per split, no question in two splits (seeded)."""
    if name not in TASKS:
        raise ConfigError(f"unknown lm task {name!r}; valid: {', '.join(TASKS)}")
    gen, _ = TASKS[name]
    rng = np.random.default_rng([seed, *name.encode()])
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < sum(sizes):
        question, work, value = gen(rng)
        tries += 1
        if tries > 50 * sum(sizes):
            raise ConfigError(f"lm task {name!r}: cannot draw {sum(sizes)} distinct questions")
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": answer_text(value, work)})
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}


def write_jsonl(root: str | os.PathLike[str], sizes: tuple[int, int, int], seed: int) -> list[Path]:
    """``root/<task>/{train,test}.jsonl`` (train holding train + val) in the layout the ``math`` suite reads."""
    written = []
    for name in TASKS:
        rows = task_rows(name, sizes, seed)
        for split, part in (("train", rows["train"] + rows["val"]), ("test", rows["test"])):
            path = Path(root) / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
            written.append(path)
    return written
