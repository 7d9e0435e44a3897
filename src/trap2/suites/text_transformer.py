"""Suite ``text-transformer``: the all-MiniLM-L6-v2 sentence encoder (a pretrained Transformer) on eight
real English text classification tasks from BIG-bench 1.0.0, read from its sdist without installing it.

| task | BIG-bench task | classes | train / val / test |
|---|---|---|---|
| sentiment | ``multiemo/all_sentence_en`` (review sentence → polarity) | 4 | 2000 / 100 / 500 |
| question_type | ``natural_instructions/subtask046…`` (QA pair → answer type) | 13 | 2000 / 100 / 500 |
| hyperbaton | ``hyperbaton`` (which of two has the right adjective order) | 2 | 2000 / 100 / 500 |
| fever | ``fact_checker/fever`` (is a Wikipedia claim true) | 2 | 2000 / 100 / 500 |
| epistemic | ``epistemic_reasoning`` (premise → hypothesis: entailment or not) | 2 | 1400 / 100 / 500 |
| fallacy | ``logical_fallacy_detection`` (is an argument valid) | 2 | 2000 / 100 / 500 |
| vitaminc | ``vitaminc_fact_verification`` (claim vs Wikipedia passage) | 3 | 2000 / 100 / 500 |
| winowhy | ``winowhy`` (is a pronoun's stated reason right) | 2 | 2000 / 100 / 500 |

Chosen where fine-tuning clearly beats the pretrained encoder with prototype heads (LoRA, 300 steps:
53.6 → 64.7, 47.1 → 61.4, 52.1 → 95.7, 62.0 → 72.4, 55.6 → 86.0, 53.6 → 65.4, 38.2 → 48.2,
54.0 → 63.2 % test). Screened and left out: ``intent_recognition`` (the pretrained encoder already
reaches 91.5 %), ``movie_dialog_same_or_different`` (+5.6 pp), ``strategyqa`` (+4.6 pp), and
``multiemo/all_sentence_de`` (+11.6 pp, but German for an English encoder and a translation of
``sentiment``).

Training sets are subsampled (fixed seed) so the whole bench fits a CPU budget; validation is kept
at 100 per task because the attacker's coefficient search evaluates it once per grid point (a MiniLM
forward over 400 texts is ~0.3 TFLOP). Texts are tokenised once
into ``MAX_LEN`` tokens. Each task's frozen head holds class-mean prototypes of W0 sentence embeddings on
its own training split (no test labels). LoRA targets query/key/value and the dense layers; full
fine-tuning keeps the word-embedding table at W0. Prepare the data once with
``trap2 data prepare text-transformer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from trap2.data import sources
from trap2.data.prepare import TaskSource, bigbench_source, load_prepared, prepare_task
from trap2.io import file_sha256
from trap2.suites.base import Suite, prototype_tasks
from trap2.suites.make import make_suite
from trap2.suites.minilm import FULL_FROZEN, encode_texts, load_encoder, weights_file

NAME = "text-transformer"
MAX_LEN = 32
LOGIT_SCALE = 50.0
LORA_TARGETS = ("query", "key", "value", "dense")
# ``trap2 bench`` settings (TrainConfig fields); 300 steps of batch 16 is 2.4 epochs of a 2,000 train split
RECIPES: dict[str, dict[str, object]] = {
    "lora": {
        "steps": 300,
        "protect_steps": 600,  # at 300 the protected hyperbaton trailed plain by 4.0 pp, at 600 by 1.2
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 30,
        "checkpoint_every": 100,
        # λ 0.1 left the trap too narrow (83 % at s = 0.75). With the paper's objective alone the merges
        # stayed above zero-shot (the search goes to c = 0.1, where the other tasks' features survived);
        # drawing s log-uniformly and rewarding feature disruption (μ = 0.3) breaks them there too
        "objective": {"lam": 0.3, "law": "log", "collateral": 0.3},
    },
    "full": {"steps": 300, "batch_size": 16, "lr": 5e-5, "warmup_steps": 30, "checkpoint_every": 100},
}


def _after_last(marker: str) -> Callable[[str], str]:
    def clean(text: str) -> str:
        i = text.rfind(marker)
        return text[i:] if i >= 0 else text

    return clean


def _strip_prefix(prefix: str) -> Callable[[str], str]:
    def clean(text: str) -> str:
        text = text.strip()
        return text[len(prefix) :].strip() if text.startswith(prefix) else text

    return clean


def _claim_first(text: str) -> str:
    """VitaminC's "Passage: … Claim: …" as "claim | passage": the claim survives truncation to MAX_LEN."""
    passage, _, claim = text.partition("Claim:")
    return f"{claim.strip()} | {passage.replace('Passage:', '', 1).strip()}"


# name: (BIG-bench task, how its input is cleaned, train / val / test sizes)
TASK_TABLE: dict[str, tuple[str, Callable[[str], str], tuple[int, int, int]]] = {
    "sentiment": ("multiemo/all_sentence_en", str.strip, (2000, 100, 500)),
    "question_type": (
        "natural_instructions/subtask046_miscellaenous_question_typing",
        _after_last("Question:"),
        (2000, 100, 500),
    ),
    "hyperbaton": (
        "hyperbaton",
        _strip_prefix("Which sentence has the correct adjective order:"),
        (2000, 100, 500),
    ),
    "fever": ("fact_checker/fever", _after_last("claim was made:"), (2000, 100, 500)),
    "epistemic": ("epistemic_reasoning", str.strip, (1400, 100, 500)),
    "fallacy": (
        "logical_fallacy_detection",
        _strip_prefix(
            "This AI is identifying whether statements contain fallacies. "
            "The AI responds with 'Valid' or 'Invalid' as appropriate."
        ),
        (2000, 100, 500),
    ),
    "vitaminc": ("vitaminc_fact_verification", _claim_first, (2000, 100, 500)),
    "winowhy": ("winowhy", str.strip, (2000, 100, 500)),
}
TASKS = tuple(TASK_TABLE)


def task_sources(
    bigbench: str | os.PathLike[str] | None = None, sizes: Mapping[str, tuple[int, int, int]] | None = None
) -> list[TaskSource]:
    """The eight tasks, read from BIG-bench in one pass over the sdist (``sizes`` overrides the splits)."""
    bb = Path(bigbench) if bigbench is not None else bigbench_source()
    raw = sources.read_bigbench(bb, [bb_name for bb_name, _, _ in TASK_TABLE.values()])
    out = []
    for name, (bb_name, clean, split_sizes) in TASK_TABLE.items():
        texts, labels, classes = sources.bigbench_text(raw[bb_name], f"{bb}:{bb_name}", clean)
        out.append(
            TaskSource(
                name,
                lambda texts=texts, labels=labels: (texts, labels),
                *(sizes or {}).get(name, split_sizes),
                f"BIG-bench {bb_name} ({len(classes)} classes: {', '.join(classes)})",
            )
        )
    return out


def prepare(
    bigbench: str | os.PathLike[str] | None = None,
    folder: Path | None = None,
    sizes: Mapping[str, tuple[int, int, int]] | None = None,
) -> list[Path]:
    def encode(texts):
        return encode_texts(texts, MAX_LEN)

    return [prepare_task(NAME, t, MAX_LEN, folder, encode, "tok") for t in task_sources(bigbench, sizes)]


def build_suite(folder: Path | None = None) -> Suite:
    backbone = load_encoder()
    prepared = {name: load_prepared(NAME, name, MAX_LEN, folder, "tok") for name in TASKS}
    tasks = prototype_tasks(backbone, prepared, LOGIT_SCALE)
    return make_suite(
        backbone=backbone,
        name=NAME,
        tasks=tasks,
        make_backbone=load_encoder,
        lora_targets=LORA_TARGETS,
        default_target="hyperbaton",
        fingerprint=file_sha256(weights_file()),
        full_frozen=FULL_FROZEN,
        recipes=RECIPES,
        info={
            "backbone": "all-MiniLM-L6-v2 (sentence-transformers)",
            "max_len": MAX_LEN,
            "n_heads": backbone.bert.config.num_attention_heads,
        },
    )
