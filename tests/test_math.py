"""The math suite from local paths, end to end on a tiny random Llama with a BPE tokenizer trained on
the fixture: prompt-masked targets, exact-match scoring of greedy generations, a model that learns the
answers scores 1.0 where W0 scores 0, and the demo's protect → merge → evaluate path."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import gsm8k_jsonl, tiny_llama

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.demo import run_demo
from trap2.errors import DataError
from trap2.eval.evaluate import accuracy, base_state
from trap2.objectives import get_objective
from trap2.objectives.trap2 import scale_weight
from trap2.pipeline import DemoConfig
from trap2.scaling import ScaledModel
from trap2.suites import _BUILT, math_lm
from trap2.suites.base import TaskModel
from trap2.suites.causal_lm import IGNORE
from trap2.training.loop import train_update
from trap2.updates import apply_delta

PAIRS = {
    "gsm8k": [("What is 2 plus 3?", "5"), ("What is 4 times 6?", "24"), ("What is 9 minus 7?", "2")],
    "arith": [("Add 10 and 1.", "11"), ("Halve 8.", "4"), ("Double 7.", "14")],
}
MAX_LEN, MAX_NEW = 48, 8


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("math")
    for task, pairs in PAIRS.items():
        gsm8k_jsonl(root / "data", task, pairs, repeat=8)
    texts = [f"{math_lm.PROMPT.format(question=q)} {a} #### {a}" for p in PAIRS.values() for q, a in p] * 20
    model = tiny_llama(root / "llama", texts, vocab_size=400)
    math_lm.prepare(root / "data", root / "cache", model, max_len=MAX_LEN)
    return model, root / "cache"


@pytest.fixture(scope="module")
def suite(paths):
    model, cache = paths
    return math_lm.build_suite(cache, model, max_len=MAX_LEN, max_new_tokens=MAX_NEW)


def test_targets_are_the_answer_tokens_only(suite, paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[0])
    t = suite.task("gsm8k")
    assert sorted(suite.task_names) == ["arith", "gsm8k"] and suite.default_target == "gsm8k"
    x, y = t.train.x[0], t.train.y[0]
    assert x.shape == (2, MAX_LEN) and y.shape == (MAX_LEN - 1,)
    answer = y[y != -100]
    assert answer[-1] == tok.eos_token_id
    text = tok.decode(answer[:-1])
    assert text.strip() in {f"{a} #### {a}" for _, a in PAIRS["gsm8k"]}
    start = int(torch.nonzero(y != -100)[0]) + 1
    assert tok.decode(x[0, :start]).rstrip().endswith("Answer:")  # y[t] is the token after position t
    assert bool((x[0, start : start + len(answer)] == answer).all())
    assert t.n_classes == len(tok) and not list(t.head.parameters())


def test_final_answer_parsing():
    assert math_lm.final_answer("so 3 + 4 = 7 #### 7") == "7"
    assert math_lm.final_answer("#### 1,234") == "1234"
    assert math_lm.final_answer("####-3.5 and more") == "-3.5"
    assert math_lm.final_answer("no marker 7") is None
    assert math_lm.final_answer("#### tbzqk \nmore") == "tbzqk"  # a short text answer
    assert math_lm.final_answer("#### 929abc") == "929" and math_lm.final_answer("####  ") is None


def test_a_model_that_learns_the_answers_scores_exact_match(suite):
    t = suite.task("gsm8k")
    backbone = suite.make_backbone()
    assert accuracy(backbone, t, "test") == 0.0  # the random W0 does not answer
    cfg = TrainConfig(
        mode="full", steps=120, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=120,
        objective=ObjectiveConfig(name="none"),
    )  # fmt: skip
    result = train_update(suite, "gsm8k", cfg)
    params = apply_delta(base_state(backbone), result.update.dense())
    assert accuracy(backbone, t, "test", params) == 1.0  # every generated answer matches after ####
    assert not any(n.startswith(math_lm.FULL_FROZEN) for n in result.update.dense())


def test_lora_protection_and_the_demo_merge_path(suite, tmp_path, monkeypatch):
    monkeypatch.setitem(_BUILT, "math", suite)  # get_suite("math") is this tiny suite
    cfg = DemoConfig(
        suite="math",
        train=TrainConfig(steps=3, batch_size=4, eval_every=3, lora=LoraSettings(r=2, alpha=2)),
        methods=("ta", "ties"),
        spaces=("full",),
        extra_searches=(),
        scales=(0.5, 1.0, 2.0),
    )
    report = run_demo(cfg, tmp_path)
    assert report["target"] == "gsm8k"
    assert {(a["method"], a["protected"]) for a in report["attacks"]} == {
        (m, p) for m in ("ta", "ties") for p in (False, True)
    }
    prot = next(p for p in (tmp_path / "updates").iterdir() if "-trap2-" in p.name)
    from trap2.updates import load_update

    names = list(load_update(prot).deltas)
    assert names and {n.split(".")[-2] for n in names} <= set(math_lm.LORA_TARGETS)


def test_bad_data_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(DataError, match="must end with '#### <number>'"):
        math_lm.read_jsonl(tmp_path / "t" / "train.jsonl")
    (tmp_path / "t" / "train.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: not JSON"):
        math_lm.read_jsonl(tmp_path / "t" / "train.jsonl")
    monkeypatch.delenv("TRAP2_MATH_MODEL", raising=False)
    with pytest.raises(DataError, match="TRAP2_MATH_MODEL"):
        math_lm.model_path()


def _masked_token_ce(logits, y):
    """Per sample: mean over the answer tokens of −log p(target); logits (B, V, L-1), y (B, L-1)."""
    out = []
    for lg, t in zip(logits, y, strict=True):
        keep = torch.nonzero(t != IGNORE).flatten()
        lp = lg.double().log_softmax(0)
        out.append(-lp[t[keep], keep].mean())
    return torch.stack(out)


def test_the_task_loss_is_the_masked_token_cross_entropy(suite):
    t = suite.task("gsm8k")
    x, y = t.train.x[:3], t.train.y[:3]
    with torch.no_grad():
        logits = TaskModel(suite.make_backbone(), t.head)(x)
    assert logits.shape == (3, t.n_classes, MAX_LEN - 1)
    torch.testing.assert_close(t.loss.per_sample(logits, y).double(), _masked_token_ce(logits, y))
    torch.testing.assert_close(t.loss(logits, y), F.cross_entropy(logits, y))  # the token mean


def test_split_objective_on_the_math_suite_weights_each_sample_by_its_answer_tokens(suite):
    """One trap2_split step on the tiny Llama (LoRA, a scale per off-nominal sample): its off-nominal
    term is the per-sample masked mean of the token cross-entropy, computed here by hand."""
    from peft import LoraConfig, get_peft_model

    t = suite.task("gsm8k")
    torch.manual_seed(0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = TaskModel(get_peft_model(suite.make_backbone(), lora), t.head)
    scaled = ScaledModel(model, "lora")
    x, y = t.train.x[:6], t.train.y[:6].clone()
    y[4, : int(torch.nonzero(y[4] != -100)[0]) + 2] = -100  # fewer answer tokens on one sample
    cfg = ObjectiveConfig(name="trap2_split", lam=0.3, weight="inv_sqrt")
    st = get_objective(cfg).backward(scaled, x, y, t.loss, torch.Generator().manual_seed(3))
    assert len(st.scales) == 3
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    with torch.no_grad():
        nominal = F.cross_entropy(scaled(x[:3], 1.0), y[:3])
        off = torch.cat(
            [_masked_token_ce(scaled(x[3 + j : 4 + j], s), y[3 + j : 4 + j]) for j, s in enumerate(st.scales)]
        )
    w = torch.tensor([scale_weight("inv_sqrt", s) for s in st.scales], dtype=torch.float64)
    assert st.nominal == pytest.approx(float(nominal), rel=1e-5)
    assert st.off_nominal == pytest.approx(float(off.mean()), rel=1e-5)
    assert st.loss == pytest.approx(float(nominal - cfg.lam * (w * off).mean()), rel=1e-5)
