"""A suite from a local causal LM folder and prompt/answer data files: one task per data file or folder.

Data per task (``TaskFiles.data``), one example a row with a ``prompt`` and an ``answer`` string:

- a ``.jsonl`` file (one JSON object a line) or a ``.csv`` file with a header;
- a folder with ``train``, ``validation`` (or ``val``) and ``test`` files in either format;
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose ``train`` / ``validation`` / ``test`` splits are used).

A split that the data does not give is carved from the training rows (all rows for a single file) with
``seed``: ``test_fraction`` and ``val_fraction`` of them, the same carving every run.

Each example is the prompt followed by the answer as written (put the separator you want in either
field) and EOS, encoded with :func:`trap2.suites.causal_lm.encode_pairs` and right-padded to the task's
longest example (``max_len`` bounds it): the loss is the cross-entropy on the answer tokens (and EOS) only. The backbone's parameter names are the transformers model's own
(:class:`~trap2.suites.causal_lm.PlainCausalLMBackbone`), so an adapter trained with PEFT on the plain
``AutoModelForCausalLM`` applies by name. Scoring, per task:

- ``loglik``: multiple-choice accuracy — an example is right when its gold answer has strictly the
  highest total answer-token log-likelihood (EOS included) among the task's distinct answers (at most
  ``MAX_CHOICES``; with more, use ``exact``);
- ``exact``: exact match of the greedy generation with the answer (both stripped);
- ``auto``: ``loglik`` where a task has 2 to ``MAX_CHOICES`` distinct answers, else ``exact``.

Errors name the file and the row: ``file:line`` for JSONL and CSV (the physical line), ``folder [split]
row i`` (0-based) for a datasets folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trap2.data.files import jsonl_values
from trap2.data.prepare import weights_fingerprint
from trap2.errors import ConfigError, DataError
from trap2.hf.targets import default_lora_targets
from trap2.suites.base import Evaluator, Split, Suite, Task
from trap2.suites.causal_lm import (
    AnswerChoice,
    ExactMatch,
    answer_ids,
    encode_pairs,
    generation_task,
    load_causal_lm,
    load_tokenizer,
    pad_id,
)
from trap2.suites.files import TaskFiles
from trap2.suites.make import make_suite
from trap2.suites.math_lm import RECIPES

COLUMNS = ("prompt", "answer")
MAX_CHOICES = 20
SCORINGS = ("loglik", "exact", "auto")
SPLITS = ("train", "val", "test")
SPLIT_STEMS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
FORMATS = (".jsonl", ".csv")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    where: str  # the file and row, for errors


# --- reading ------------------------------------------------------------------------------------------


def _example(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: not an object with 'prompt' and 'answer'")
    for col in COLUMNS:
        if col not in row or row[col] is None:
            raise DataError(f"{where}: missing column {col!r} (a causal-LM task needs 'prompt' and 'answer')")
    prompt, answer = row["prompt"], row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    for col, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {col!r} must be a string, got {type(value).__name__}")
    if not answer.strip():
        raise DataError(f"{where}: empty 'answer'")
    return Example(prompt, answer, where)


def read_file(path: Path) -> list[Example]:
    """The examples of one ``.jsonl`` or ``.csv`` file (an empty file gives none)."""
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; valid: {', '.join(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold newlines
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing and reader.fieldnames:
            raise DataError(
                f"{path}:1: missing column {missing[0]!r} (columns: {', '.join(reader.fieldnames)}; a "
                "causal-LM task needs 'prompt' and 'answer')"
            )
        return [_example(row, f"{path}:{reader.line_num}") for row in reader]
    return [_example(row, at) for at, row in jsonl_values(path, text)]


def _is_datasets_folder(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def read_datasets_folder(folder: Path) -> dict[str, list[Example]]:
    """The splits of a ``save_to_disk`` folder: {"all": ...} for a Dataset, else train / val / test."""
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise DataError(f"{folder}: reading a datasets folder needs the 'datasets' package") from None
    try:
        loaded = load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: not a loadable datasets folder ({e})") from None
    parts = {"all": loaded} if isinstance(loaded, Dataset) else dict(loaded)
    found = {}
    for key, ds in parts.items():
        split = next((s for s, stems in SPLIT_STEMS.items() if key in stems), key)
        if split not in (*SPLITS, "all"):
            continue  # another split (e.g. "unsupervised") is not a task split
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{folder} [{key}]: missing column {missing[0]!r} (columns: {', '.join(ds.column_names)})"
            )
        found[split] = [_example(row, f"{folder} [{key}] row {i}") for i, row in enumerate(ds)]
    if "train" not in found and "all" not in found:
        raise DataError(f"{folder}: the DatasetDict has no 'train' split (splits: {', '.join(parts)})")
    return found


def read_task_data(data: Path) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """The splits a task's data gives ({"all": ...} for a single file) and where each came from."""
    if data.is_file():
        return {"all": read_file(data)}, {"all": str(data)}
    if not data.is_dir():
        raise DataError(f"{data}: no such file or folder")
    if _is_datasets_folder(data):
        found = read_datasets_folder(data)
        return found, {s: f"{data} [{s}]" for s in found}
    found, source = {}, {}
    for split, stems in SPLIT_STEMS.items():
        files = [
            data / f"{stem}{ext}" for stem in stems for ext in FORMATS if (data / f"{stem}{ext}").is_file()
        ]
        if len(files) > 1:
            raise DataError(
                f"{data}: {' and '.join(f.name for f in files)} are both the {split} split; keep one"
            )
        if files:
            found[split], source[split] = read_file(files[0]), str(files[0])
    if "train" not in found:
        raise DataError(
            f"{data}: no train.jsonl or train.csv (or a datasets save_to_disk folder) inside; a task folder "
            "holds train / validation / test files"
        )
    return found, source


def carve_splits(
    found: dict[str, list[Example]],
    source: dict[str, str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, list[Example]]:
    """train / val / test: the splits given, the missing ones carved (seeded) from the training rows."""
    pool_key = "all" if "all" in found else "train"
    pool = found[pool_key]
    out = {s: found[s] for s in SPLITS if s in found}
    carve = [(s, f) for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in found]
    order = np.random.default_rng(seed).permutation(len(pool))
    start = 0
    for split, fraction in carve:
        n = max(1, round(len(pool) * fraction)) if fraction > 0 else 0
        out[split] = [pool[i] for i in order[start : start + n]]
        start += n
    if carve:
        out["train"] = [pool[i] for i in np.sort(order[start:])]
    for split in SPLITS:
        if not out[split]:
            how = (
                "no rows"
                if split in found
                else f"carved from {len(pool)} rows with val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
            raise DataError(f"{source.get(split, source[pool_key])}: the {split} split is empty ({how})")
    return out


# --- the suite ----------------------------------------------------------------------------------------


def _candidates(tok, found: dict[str, list[Example]]) -> tuple[list[tuple[int, ...]], list[Example]]:
    """The task's distinct answers as token ids (EOS included), in reading order (the file's rows; train,
    val, test files), and the row where each first appears."""
    seen: dict[tuple[int, ...], Example] = {}
    for split in ("all", *SPLITS):
        for ex in found.get(split, []):
            seen.setdefault(tuple(answer_ids(tok, ex.answer)), ex)
    return list(seen), list(seen.values())


def _scoring(requested: str, name: str, n_choices: int, first: list[Example]) -> str:
    if requested == "auto":
        return "loglik" if 2 <= n_choices <= MAX_CHOICES else "exact"
    if requested == "loglik" and n_choices > MAX_CHOICES:
        raise DataError(
            f"{first[MAX_CHOICES].where}: task {name!r} has more than {MAX_CHOICES} distinct answers (one beyond "
            "them is here): scoring 'loglik' chooses among a task's answers; use scoring 'exact'"
        )
    if requested == "loglik" and n_choices < 2:
        raise DataError(
            f"{first[0].where}: task {name!r} has one distinct answer: scoring 'loglik' needs a choice; use "
            "scoring 'exact'"
        )
    return requested


def _task(
    spec: TaskFiles,
    found: dict[str, list[Example]],
    splits: dict[str, list[Example]],
    tok,
    scoring: str,
    max_len: int,
    batch_size: int,
) -> tuple[Task, str]:
    encoded = {}
    for split in SPLITS:
        rows = splits[split]
        x, y = encode_pairs(
            [(r.prompt, r.answer) for r in rows], tok, max_len, [r.where for r in rows], truncate=False
        )
        encoded[split] = Split(x, y)
    # padded to the task's longest example, not to max_len: every step and score computes on that width
    width = max(int(s.x[:, 1].sum(1).max()) for s in encoded.values())
    encoded = {k: Split(s.x[..., :width].clone(), s.y[:, : width - 1].clone()) for k, s in encoded.items()}
    candidates, first = _candidates(tok, found)
    scoring = _scoring(scoring, spec.name, len(candidates), first)
    metric: Evaluator
    if scoring == "loglik":
        metric = AnswerChoice(candidates, pad_id(tok), batch_size)
    else:  # a different tokenisation of the same text may take more tokens than the reference
        metric = ExactMatch(tok, 2 * max(len(c) for c in candidates) + 2, batch_size)
    description = f"{spec.data} (prompt/answer, {scoring}: {len(candidates)} distinct answers)"
    task = generation_task(spec.name, tok, encoded, description, metric)
    return task, scoring


def _skeleton(base: Path) -> nn.Module:
    """The model's modules without weights (meta device): its LoRA targets and embedding names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        raise DataError(
            f"{base}: not a causal LM that transformers loads ({str(e).splitlines()[0]})"
        ) from None


def _embedding_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Full fine-tuning leaves the token embeddings and the LM head at W0 (as the math suite does)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = (model.get_input_embeddings(), model.get_output_embeddings())
    return tuple(f"{names[id(m)]}." for m in found if m is not None and id(m) in names)


def _check_options(
    tasks: Sequence[TaskFiles], scoring: str, val_fraction: float, test_fraction: float, max_len: int
) -> None:
    if not tasks:
        raise ConfigError("a files suite needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: a task is named twice in {names}")
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring {scoring!r} is not one for causal LMs; valid: {', '.join(SCORINGS)}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0, 1), their sum below 1"
        )
    if max_len < 2:
        raise ConfigError(f"max_len={max_len}: a prompt and an answer need at least 2 tokens")


def lm_files_suite(
    base: str | os.PathLike[str],
    tasks: Sequence[TaskFiles],
    *,
    name: str | None = None,
    scoring: str = "loglik",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_len: int = 128,
    batch_size: int = 16,
    device: str = "cpu",
) -> Suite:
    """A suite on the causal LM in ``base`` (a folder ``AutoModelForCausalLM`` and ``AutoTokenizer`` load
    offline) with one task per :class:`TaskFiles` (see the module docstring for the data and scoring).

    ``batch_size`` is the evaluation batch (prompts, or (prompt, candidate) sequences for ``loglik``).
    ``device`` is where build-time work would run: this suite computes nothing on the model at build time
    (its heads are parameter-free), so the run's own device setting is what places the backbone.
    """
    from trap2.training.loop import resolve_device

    base = Path(base)
    _check_options(tasks, scoring, val_fraction, test_fraction, max_len)
    resolve_device(device)  # a bad name fails now, not later
    skeleton = _skeleton(base)
    tok = load_tokenizer(base)
    built, scorings = {}, {}
    for spec in tasks:
        found, source = read_task_data(Path(spec.data))
        splits = carve_splits(found, source, seed, val_fraction, test_fraction)
        built[spec.name], scorings[spec.name] = _task(spec, found, splits, tok, scoring, max_len, batch_size)
    return make_suite(
        name=name or f"files-{base.name}",
        tasks=built,
        make_backbone=lambda: load_causal_lm(base, plain_names=True),
        lora_targets=tuple(default_lora_targets(skeleton)),
        default_target=tasks[0].name,
        fingerprint=weights_fingerprint(base),
        info={
            "backbone": f"causal LM ({base})",
            "max_len": max_len,
            "scoring": scorings,
            "data": {t.name: str(t.data) for t in tasks},
            "seed": seed,
        },
        full_frozen=_embedding_prefixes(skeleton),
        recipes=RECIPES,
    )
