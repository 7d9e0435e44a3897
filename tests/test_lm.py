"""The offline causal-LM suite ``lm`` on a tiny config: the character tokenizer as saved and reloaded, the
pretraining mixture (deterministic per step; its question/answer part in the tasks' format, of other task
families), pretraining resumed from a
checkpoint equal to an uninterrupted run, the GSM8K-format tasks (right answers, readable by the math
suite), the suite's encoding and metric, and the shipped backbone's record."""

import json
import re

import numpy as np
import pytest
import torch

from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy
from trap2.suites import causal_lm, lm, lm_pretrain, lm_tasks, lm_text, math_lm

# a tiny Llama; its wide initialisation lets a few LoRA steps move the loss
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "initializer_range": 0.2}  # fmt: skip
ENGLISH = [f"Sentence number {i} says the quick brown fox jumps over the lazy dog." for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return lm_text.make_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    """A tiny Llama with the suite's tokenizer, written by ``save_backbone`` as the shipped one is."""
    folder = tmp_path_factory.mktemp("lm") / "model"
    cfg = lm_pretrain.PretrainConfig(steps=2, batch_size=2, n_val=4, shape=TINY, english_share=0.5)
    mix = lm_text.Mixture(tok, ENGLISH, cfg.english_share, cfg.seed)
    state = lm_pretrain.train(lm_pretrain.start(cfg, tok), cfg, mix)
    loss = lm.save_backbone(state.model, tok, folder, mix.validation(cfg.n_val), {"seed": 0})
    return folder, loss, mix.validation(cfg.n_val)


@pytest.fixture(scope="module")
def suite(tiny_folder):
    return lm.build_suite(tiny_folder[0], sizes=(16, 6, 12))


def test_the_tokenizer_is_one_token_per_character_and_reloads(tiny_folder, tok):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tiny_folder[0])
    text = "Question: What is 12 plus 30?\nAnswer: #### 42"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and len(ids) == len(text) + 1
    assert ids == tok(text)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert len(loaded) == len(lm_text.SPECIALS) + len(lm_text.CHARS) == 100


def test_the_mixture_is_a_function_of_seed_and_step_and_draws_every_part(tok):
    a, b = (
        lm_text.Mixture(tok, ENGLISH, 0.4, 3, qa_share=0.3),
        lm_text.Mixture(tok, ENGLISH, 0.4, 3, qa_share=0.3),
    )
    assert torch.equal(a.batch(5, 8), b.batch(5, 8)) and not torch.equal(a.batch(5, 8), a.batch(6, 8))
    assert torch.equal(a.validation(6), b.validation(6))
    rows = a.batch(0, 64)
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    assert any("fox" in t for t in texts) and any("=" in t and "Question" not in t for t in texts)
    qa = [r for r in rows if tok.decode(r[1:10]) == "Question:"]
    assert 10 <= len(qa) <= 30  # about 0.3 of 64
    # a question/answer row is examples each closed by <eos>, exactly as the suite encodes a task example
    first = qa[0][1:].tolist()
    end = first.index(tok.eos_token_id)
    assert re.fullmatch(r"Question: [^\n]+\nAnswer: [^\n]*#### \S+", tok.decode(first[:end]))
    assert lm_text.Mixture(tok, ENGLISH, 0.5, 3).batch(0, 64).ne(a.batch(0, 64)).any()
    with pytest.raises(Exception, match="sum to <= 1"):
        lm_text.Mixture(tok, ENGLISH, 0.8, 3, qa_share=0.3)
    with pytest.raises(ConfigError, match="sum to <= 1"):
        lm_pretrain.PretrainConfig(english_share=0.8, qa_share=0.3)


def test_the_question_answer_examples_are_right_and_never_a_suite_task(tok):
    """The Q/A part teaches the format on other task families: no suite task's question or wording."""
    rng = np.random.default_rng(0)
    suite_words = ("plus", "twice", "times", "comes after", "backwards", "in order")
    families = set()
    for _ in range(400):
        ex = lm_text.qa_example(rng)
        question = ex.split("\n")[0].removeprefix("Question: ")
        work, value = ex.split("\nAnswer: ")[1].split("#### ")
        assert ex.startswith("Question: ") and value == math_lm.final_answer(ex)
        assert not any(w in question for w in suite_words)
        words = question.rstrip("?.").split()
        if work.strip():
            left, right = work.strip().split("=")
            assert int(right) == int(value) == eval(left.replace("%", " % "))
            families.add("arith")
        elif question.startswith("Reverse "):
            assert value == words[1][::-1]
        elif question.startswith("Sort "):
            assert value == "".join(sorted(words[1]))
        elif question.startswith("Which is larger"):
            assert int(value) == max(int(words[3].rstrip(",")), int(words[5]))
        elif "first letter" in question:
            assert value == words[-1][0]
        elif "last letter" in question:
            assert value == words[-1][-1]
        elif question.startswith("How many letters"):
            assert int(value) == len(words[-1])
        elif "capital" in question:
            assert value == words[1].upper()
        else:
            assert question.startswith("Copy ") and value == words[1]
        families.add(question.split()[0] + question.split()[-2])
    assert len(families) >= 10
    for name in lm_tasks.TASKS:
        questions = {r["question"] for r in lm_tasks.task_rows(name, (20, 5, 5), 1)["train"]}
        assert not any(lm_text.qa_example(np.random.default_rng(i)).split("\n")[0][10:] in questions
                       for i in range(200))  # fmt: skip
    # the symbolic lines are right
    for _ in range(200):
        line = lm_text.synthetic_line(rng)
        left, right = line.split("=")
        if left.startswith("rev("):
            assert right == left[4:-1][::-1]
        elif left.startswith("sort("):
            assert right == "".join(sorted(left[5:-1]))
        else:
            assert int(right) == eval(left.replace("%", " % "))  # plain integer arithmetic


def test_pretraining_resumed_from_a_checkpoint_equals_one_run(tmp_path, tok):
    cfg = lm_pretrain.PretrainConfig(steps=4, batch_size=2, warmup_steps=1, shape=TINY, english_share=0.5)
    mix = lm_text.Mixture(tok, ENGLISH, cfg.english_share, cfg.seed)
    whole = lm_pretrain.train(lm_pretrain.start(cfg, tok), cfg, mix)
    part = lm_pretrain.train(lm_pretrain.start(cfg, tok), cfg, mix, max_steps=2)
    assert part.step == 2
    lm_pretrain.save_checkpoint(part, cfg, tmp_path / "ckpt.pt")
    resumed = lm_pretrain.train(lm_pretrain.resume(cfg, tok, tmp_path / "ckpt.pt"), cfg, mix)
    assert resumed.step == 4
    for (n, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    other = lm_pretrain.PretrainConfig(steps=5, batch_size=2, warmup_steps=1, shape=TINY, english_share=0.5)
    with pytest.raises(ConfigError, match="other settings"):
        lm_pretrain.resume(other, tok, tmp_path / "ckpt.pt")


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = lm_pretrain.PretrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lm_pretrain.lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lm_pretrain.lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lm_pretrain.lr_at(cfg, 55) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert lm_pretrain.lr_at(cfg, 100) == pytest.approx(1e-4)


def test_the_saved_backbone_records_the_loss_of_its_float16_weights(tiny_folder):
    folder, loss, val = tiny_folder
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["val_loss"] == pytest.approx(loss, abs=1e-4) and record["seed"] == 0
    from trap2.io import file_sha256

    assert record["sha256"] == file_sha256(folder / "model.safetensors")
    model = lm.load_lm(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert lm_pretrain.validation_loss(model, val) == pytest.approx(loss, abs=1e-6)


@pytest.mark.parametrize("name", list(lm_tasks.TASKS))
def test_task_rows_are_right_distinct_and_in_gsm8k_format(name):
    rows = lm_tasks.task_rows(name, (40, 10, 20), seed=1)
    questions = [r["question"] for part in rows.values() for r in part]
    assert [len(rows[s]) for s in lm_tasks.SPLITS] == [40, 10, 20] and len(set(questions)) == 70
    assert rows == lm_tasks.task_rows(name, (40, 10, 20), seed=1)
    for r in rows["train"]:
        value = math_lm.final_answer(r["answer"])
        assert value == _solve(name, r["question"])
        work, _, _ = r["answer"].rpartition(" #### ")
        if name in ("reverse", "sort"):
            assert work == ""
        else:  # the equation the backbone's pretraining knows, e.g. 745+195=940
            lhs, _, result = work.strip().partition("=")
            assert result == value and str(eval(lhs)) == value  # noqa: S307 (digits and + - * % only)
            assert set(lhs) <= set("0123456789+-*%")


@pytest.mark.parametrize("name", list(lm_tasks.TASKS))
def test_every_task_draws_the_suites_split_sizes(name):
    rows = lm_tasks.task_rows(name, lm.SIZES, seed=0)
    assert [len(rows[s]) for s in lm_tasks.SPLITS] == list(lm.SIZES)
    assert len({r["question"] for part in rows.values() for r in part}) == sum(lm.SIZES)


def _solve(name: str, q: str) -> str:
    """An independent solver of each task's questions, from their wording."""
    words = q.rstrip("?.").split()
    nums = [int(w) for w in words if w.isdigit()]
    if name in ("add", "multiply"):
        a, b = nums
        return str({"add": a + b, "multiply": a * b}[name])
    if name in ("double", "next"):
        return str(2 * nums[0] if name == "double" else nums[0] + 1)
    word = words[1] if name == "reverse" else words[4]
    return word[::-1] if name == "reverse" else "".join(sorted(word))


def test_the_math_suite_reads_the_written_jsonl(tmp_path):
    lm_tasks.write_jsonl(tmp_path, (8, 2, 5), seed=0)
    assert sorted(math_lm.task_names(tmp_path)) == sorted(lm_tasks.TASKS)
    add = math_lm.read_jsonl(tmp_path / "add" / "train.jsonl")
    assert len(add) == 10 and math_lm.final_answer(add[0]["answer"]) == _solve("add", add[0]["question"])
    assert len(math_lm.read_jsonl(tmp_path / "sort" / "test.jsonl")) == 5


def test_examples_train_the_answer_tokens_only(suite, tok):
    t = suite.task("add")
    x, y = t.train.x[0], t.train.y[0]
    prompt, answer = causal_lm.prompt_and_answer(x, y)
    assert tok.decode(prompt, skip_special_tokens=True).startswith("Question: What is ")
    assert tok.decode(prompt).endswith("?\nAnswer:") and answer[-1] == tok.eos_token_id
    a, b = (int(v) for v in tok.decode(prompt, skip_special_tokens=True)[18:].split("?")[0].split(" plus "))
    assert tok.decode(answer, skip_special_tokens=True) == f" {a}+{b}={a + b} #### {a + b}"
    assert x.shape == (2, lm.MAX_LEN) and int((y != causal_lm.IGNORE).sum()) == len(answer)
    assert sorted(suite.task_names) == sorted(lm_tasks.TASKS) and suite.default_target == "add"
    names = dict(suite.make_backbone().named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names


class _Oracle(torch.nn.Module):
    """Logits that put all mass on a fixed next token per (prompt, position): greedy decoding returns
    ``replies[i]`` for prompt i, whatever the cache does."""

    def __init__(self, vocab: int, replies: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__()
        self.vocab, self.replies = vocab, replies
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        ids, mask = x[:, 0], x[:, 1]
        out = torch.zeros(*ids.shape, self.vocab)
        for i in range(len(ids)):
            seq = ids[i][mask[i].bool()].tolist()
            for prompt, reply in self.replies.items():
                if seq[: len(prompt)] == list(prompt):
                    k = len(seq) - len(prompt)
                    out[i, -1, reply[k] if k < len(reply) else 0] = 1.0
        return out


def test_exact_match_scores_the_text_after_the_marker(suite, tok):
    t = suite.task("reverse")
    split = type(t.test)(t.test.x[:4], t.test.y[:4])
    replies = {}
    for i, (x, y) in enumerate(zip(split.x, split.y, strict=True)):
        prompt, answer = causal_lm.prompt_and_answer(x, y)
        if i == 1:  # a wrong value
            answer = tok(" #### zzzz", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if i == 2:  # no marker
            answer = answer[5:]
        replies[tuple(prompt)] = answer
    assert t.evaluate(_Oracle(len(tok), replies), split, None) == pytest.approx(0.5)


def test_greedy_answers_with_the_cache_equal_recomputing(suite, monkeypatch):
    """The key/value cache (our backbones) returns the same tokens as recomputing every step, on left-padded
    prompts of different lengths, with parameter overrides."""
    t = suite.task("reverse")
    backbone = suite.make_backbone()
    prompts = [causal_lm.prompt_and_answer(x, y)[0] for x, y in zip(t.test.x, t.test.y, strict=True)]
    assert len({len(p) for p in prompts}) > 1
    g = torch.Generator().manual_seed(0)
    params = {n: p + 0.3 * torch.randn(p.shape, generator=g) for n, p in backbone.named_parameters()}
    assert causal_lm._new_cache(backbone) is not None
    cached = causal_lm.greedy_answers(backbone, prompts, 2, 0, 8, params)
    monkeypatch.setattr(causal_lm, "_new_cache", lambda b: None)
    assert causal_lm.greedy_answers(backbone, prompts, 2, 0, 8, params) == cached
    assert len({tuple(c) for c in cached}) > 1  # the overrides make it answer something


def test_a_lora_fine_tune_lowers_the_answer_loss_on_the_suite(suite):
    from torch.func import functional_call

    from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
    from trap2.eval.evaluate import base_state
    from trap2.training.loop import train_update
    from trap2.updates import apply_delta

    t = suite.task("sort")
    backbone = suite.make_backbone()
    assert accuracy(backbone, t, "train") == 0.0

    def loss(params):
        with torch.no_grad():
            return float(t.loss(t.head(functional_call(backbone, params, (t.train.x,))), t.train.y))

    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-2, warmup_steps=5, eval_every=60,
                      lora=LoraSettings(r=8, alpha=16), objective=ObjectiveConfig(name="none"))  # fmt: skip
    update = train_update(suite, "sort", cfg).update
    assert {n.split(".")[-2] for n in update.dense()} <= set(lm.LORA_TARGETS)
    w0 = base_state(backbone)
    assert loss(apply_delta(w0, update.dense())) < 0.6 * loss(w0)


SHIPPED = lm.ASSET_DIR / "pretrain.json"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the lm backbone is not built")
def test_the_shipped_backbone_matches_its_record():
    from trap2.io import file_sha256

    record = json.loads(SHIPPED.read_text())
    assert record["sha256"] == file_sha256(lm.ASSET_DIR / "model.safetensors")
    assert {"command", "steps", "val_loss"} <= set(record) and record["config"]["seed"] == 0
    model = lm.load_lm()
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 3e6
    assert (lm.ASSET_DIR / "model.safetensors").stat().st_size < 4e6


def test_the_bench_runs_on_the_suite(suite, tmp_path, monkeypatch):
    """`trap2 bench --suite lm` end to end on the tiny config: LoRA, the plain pool and the protected
    target (w(s) = 1/√s), the scaling curve and a merge; zero-shot as the metric gives it."""
    from trap2.bench import BenchConfig, run_bench
    from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
    from trap2.suites import _BUILT

    small = suite.subset(["add", "sort"])
    monkeypatch.setitem(_BUILT, "lm", small)
    lora = TrainConfig(steps=3, batch_size=4, eval_every=3, lora=LoraSettings(r=2, alpha=2),
                       objective=ObjectiveConfig(lam=0.1, weight="inv_sqrt"))  # fmt: skip
    cfg = BenchConfig(
        suite="lm", modes=("lora",), lora=lora, methods=("ta",), scales=(0.5, 1.0, 2.0), threats=None
    )
    summary = run_bench(cfg, tmp_path)
    (cell,) = summary["cells"]
    assert cell["target"] == "add" and set(cell["merges"]) == {"ta"}
    backbone = small.make_backbone()
    assert cell["zero_shot"]["sort"] == accuracy(backbone, small.task("sort"), "test")
    report = json.loads((tmp_path / "lora" / "add" / "report.json").read_text())
    assert report["scaling_curve"]["s"] == [0.5, 1.0, 2.0]
    assert suite.recipes["lora"]["objective"]["weight"] == "inv_sqrt"


def test_the_longest_answer_fits_the_generation_budget(tok):
    longest = max(
        len(causal_lm.answer_ids(tok, " " + r["answer"]))
        for name in lm_tasks.TASKS
        for r in lm_tasks.task_rows(name, lm.SIZES, lm.DATA_SEED)["test"]
    )
    assert longest <= lm.MAX_NEW_TOKENS  # answer + EOS
