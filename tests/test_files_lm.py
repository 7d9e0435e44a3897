"""The files suite for causal LMs on a tiny random Llama and prompt/answer data the tests write: splits
given or carved, loss on the answer tokens only (checked against transformers' own labelled loss), both
scorings equal to an independent computation with the plain transformers model (log-likelihoods from
the text, greedy answers from ``generate``), a PEFT adapter trained on the plain model applying by name,
and one-line errors naming the file and the row."""

import csv
import dataclasses
import json

import pytest
import torch
from file_helpers import write_jsonl
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama
from torch.func import functional_call

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.data.prepare import weights_fingerprint
from trap2.errors import ConfigError, DataError
from trap2.eval.evaluate import accuracy, base_state
from trap2.suites.base import TaskModel
from trap2.suites.causal_lm import AnswerChoice, ExactMatch
from trap2.suites.files import TaskFiles
from trap2.suites.files_lm import MAX_CHOICES, lm_files_suite
from trap2.training.loop import train_update
from trap2.updates import apply_delta, load_update

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]
UNSEEN = [("Egypt", "Cairo"), ("Peru", "Lima")]  # in the test split only: never trained
COLOURS = [("grass", "green"), ("sky", "blue"), ("snow", "white")]
MAX_LEN = 32


def capital(country, city):
    return {"prompt": f"Q: the capital of {country}?\nA:", "answer": f" {city}"}


def colour(thing, name):
    return {"prompt": f"Q: the colour of {thing}?\nA:", "answer": f" {name}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files_lm")
    capitals = root / "capitals"  # a folder with train and test files: val is carved from train
    write_jsonl(capitals / "train.jsonl", [capital(*p) for p in CAPITALS] * 4)
    write_jsonl(capitals / "test.jsonl", [capital(*p) for p in CAPITALS + UNSEEN])
    colours = write_jsonl(root / "colours.jsonl", [colour(*p) for p in COLOURS] * 7)  # one file: all carved
    texts = [r["prompt"] + r["answer"] for r in [capital(*p) for p in CAPITALS + UNSEEN]]
    texts += [r["prompt"] + r["answer"] for r in [colour(*p) for p in COLOURS]]
    model = tiny_llama(root / "llama", texts * 20, vocab_size=300)
    return root, model, capitals, colours


@pytest.fixture(scope="module")
def suite(files):
    _, model, capitals, colours = files
    return lm_files_suite(
        model, [TaskFiles("capitals", capitals), TaskFiles("colours", colours)], max_len=MAX_LEN, batch_size=8
    )


@pytest.fixture(scope="module")
def tok(files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files[1])


def plain_lm(folder, params=None):
    """The plain transformers model, with the backbone's parameters when given (same names)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    if params is not None:
        lm.load_state_dict(params, strict=False)
    return lm


@pytest.fixture(scope="module")
def trained(suite):
    """A full fine-tune of the capitals task (the known answers learned, the unseen ones not). Every
    parameter trains: this tiny model's frozen random LM head (std 0.02) caps its logits too low to learn
    in a few steps."""
    cfg = TrainConfig(
        mode="full", steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=60,
        objective=ObjectiveConfig(name="none"),
    )  # fmt: skip
    return train_update(dataclasses.replace(suite, full_frozen=()), "capitals", cfg).update


def test_the_suite_builds_with_given_and_carved_splits(suite, files, tok):
    from transformers import AutoModelForCausalLM

    _, model, _, _ = files
    caps, cols = suite.task("capitals"), suite.task("colours")
    assert suite.task_names == ["capitals", "colours"] and suite.default_target == "capitals"
    assert (len(caps.train), len(caps.val), len(caps.test)) == (14, 2, 6)  # 15 % of 16 train rows is val
    assert (len(cols.train), len(cols.val), len(cols.test)) == (15, 3, 3)  # 15 % + 15 % of 21 rows
    # right-padded to the task's longest prompt + answer + EOS (under max_len), every split alike
    width = max(len(tok(r["prompt"])["input_ids"] + tok(r["answer"])["input_ids"]) + 1 for r in TEST_ROWS)
    assert width < MAX_LEN and {caps.split(s).x.shape[-1] for s in ("train", "val", "test")} == {width}
    assert caps.train.x.shape == (14, 2, width) and caps.train.y.shape == (14, width - 1)
    assert suite.info["scoring"] == {"capitals": "loglik", "colours": "loglik"}
    assert suite.fingerprint == weights_fingerprint(model)
    assert set(suite.lora_targets) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert suite.full_frozen == ("model.embed_tokens.", "lm_head.")
    # the backbone's parameter names are the plain transformers model's own
    plain = dict(AutoModelForCausalLM.from_pretrained(model).named_parameters())
    backbone = dict(suite.make_backbone().named_parameters())
    assert list(backbone) == list(plain)
    assert all(torch.equal(backbone[n], plain[n]) for n in plain)
    # the same carving every run; another seed carves another
    again = lm_files_suite(model, [TaskFiles("colours", files[3])], max_len=MAX_LEN)
    assert torch.equal(again.task("colours").test.x, cols.test.x)
    other = lm_files_suite(model, [TaskFiles("colours", files[3])], max_len=MAX_LEN, seed=1)
    assert not torch.equal(other.task("colours").val.x, cols.val.x)


def test_the_loss_is_on_the_answer_tokens_only(suite, files, tok):
    caps = suite.task("capitals")
    x, y = caps.test.x[:1], caps.test.y[:1]
    row = capital(*CAPITALS[0])
    prompt = tok(row["prompt"])["input_ids"]
    answer = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert y[0][y[0] != -100].tolist() == answer  # the answer and EOS, nothing of the prompt
    assert x[0, 0, : len(prompt) + len(answer)].tolist() == prompt + answer
    assert int(x[0, 1].sum()) == len(prompt) + len(answer)
    # transformers' own loss with labels -100 on the prompt: the task's loss is the same number
    ids = torch.tensor([prompt + answer])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    backbone = suite.make_backbone()
    with torch.no_grad():
        expected = plain_lm(files[1])(input_ids=ids, labels=labels).loss
        got = caps.loss(TaskModel(backbone, caps.head)(x), y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def direct_logliks(lm, tok, prompt, answers):
    """Σ log p(answer tokens + EOS | prompt) for each answer text, from the text, one unpadded pass each."""
    out = []
    for a in answers:
        p = tok(prompt)["input_ids"]
        ids = p + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = lm(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids))))
    return out


def direct_choice_accuracy(lm, tok, rows, answers):
    right = 0
    for r in rows:
        ll = dict(zip(answers, direct_logliks(lm, tok, r["prompt"], answers), strict=True))
        right += int(all(ll[r["answer"]] > v for a, v in ll.items() if a != r["answer"]))
    return right / len(rows)


def direct_exact_accuracy(lm, tok, rows, max_new_tokens):
    right = 0
    for r in rows:
        ids = torch.tensor([tok(r["prompt"])["input_ids"]])
        out = lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        right += int(text.strip() == r["answer"].strip())
    return right / len(rows)


TEST_ROWS = [capital(*p) for p in CAPITALS + UNSEEN]
ANSWERS = [f" {c}" for _, c in CAPITALS + UNSEEN]


def test_loglik_scores_equal_a_direct_computation_from_the_text(suite, files, tok):
    caps = suite.task("capitals")
    assert isinstance(caps.evaluate, AnswerChoice)
    backbone = suite.make_backbone()
    ll, gold = caps.evaluate.logliks(backbone, caps.test, None)
    assert ll.shape == (6, 6)  # every test prompt against the task's 6 distinct answers
    cands = [tok.decode(c, skip_special_tokens=True) for c in caps.evaluate.candidates]
    lm = plain_lm(files[1])
    for i, r in enumerate(TEST_ROWS):
        assert cands[int(gold[i])] == r["answer"]
        expected = direct_logliks(lm, tok, r["prompt"], cands)
        torch.testing.assert_close(ll[i], torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert accuracy(backbone, caps, "test") == pytest.approx(
        direct_choice_accuracy(lm, tok, TEST_ROWS, ANSWERS)
    )


def test_both_scorings_of_a_trained_model_equal_the_direct_ones(suite, files, tok, trained):
    """After fine-tuning the known capitals are answered (both scorings) and the unseen ones are not;
    each score equals the one computed with the plain transformers model (text log-likelihoods,
    ``generate``)."""
    caps = suite.task("capitals")
    backbone = suite.make_backbone()
    params = apply_delta(base_state(backbone), trained.dense())
    lm = plain_lm(files[1], params)
    loglik = accuracy(backbone, caps, "test", params)
    assert loglik == pytest.approx(direct_choice_accuracy(lm, tok, TEST_ROWS, ANSWERS))
    assert loglik >= 4 / 6 > accuracy(backbone, caps, "test")  # the 4 trained answers are chosen

    exact = lm_files_suite(files[1], [TaskFiles("capitals", files[2])], scoring="exact", max_len=MAX_LEN)
    et = exact.task("capitals")
    assert isinstance(et.evaluate, ExactMatch) and exact.info["scoring"] == {"capitals": "exact"}
    score = accuracy(backbone, et, "test", params)
    assert score == pytest.approx(direct_exact_accuracy(lm, tok, TEST_ROWS, et.evaluate.max_new_tokens))
    assert score == pytest.approx(4 / 6)  # the trained answers, and never a city it has not seen
    assert accuracy(backbone, et, "test") == 0.0


def test_a_peft_adapter_trained_on_the_plain_model_applies_to_the_backbone(suite, files, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(files[1]), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    update = load_update(tmp_path / "adapter")
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    assert update.deltas and set(update.deltas) <= set(w0)  # keys are the backbone's parameter names
    update.check_base(w0, suite.fingerprint)
    caps = suite.task("capitals")
    x = caps.test.x
    params = apply_delta(w0, update.dense())
    with torch.no_grad():
        got = functional_call(backbone, params, (x,), strict=False)
        positions = (x[:, 1].cumsum(-1) - 1).clamp_min(0)
        expected = peft_model(input_ids=x[:, 0], attention_mask=x[:, 1], position_ids=positions).logits
    mask = x[:, 1].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-4, atol=1e-4)
    # the scoring under the adapter is the adapter's own
    ll, _ = caps.evaluate.logliks(backbone, caps.test, params)
    cands = [tok.decode(c, skip_special_tokens=True) for c in caps.evaluate.candidates]
    r = TEST_ROWS[0]
    with torch.no_grad():
        direct = direct_logliks(peft_model, tok, r["prompt"], cands)
    torch.testing.assert_close(ll[0], torch.tensor(direct, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_a_datasets_folder_gives_its_splits(files, tmp_path):
    pytest.importorskip("datasets", reason="the datasets package is not installed")
    from datasets import Dataset, DatasetDict

    rows = [colour(*p) for p in COLOURS]
    DatasetDict(
        {
            "train": Dataset.from_list(rows * 3),
            "validation": Dataset.from_list(rows),
            "test": Dataset.from_list(rows[:2]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    Dataset.from_list(rows * 5).save_to_disk(str(tmp_path / "ds"))
    s = lm_files_suite(
        files[1], [TaskFiles("dd", tmp_path / "dd"), TaskFiles("ds", tmp_path / "ds")], max_len=MAX_LEN
    )
    dd, ds = s.task("dd"), s.task("ds")
    assert (len(dd.train), len(dd.val), len(dd.test)) == (9, 3, 2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (11, 2, 2)  # 15 % of 15 rows each, carved


def test_auto_scoring_falls_back_to_exact_with_many_answers_and_csv_reads(files, tmp_path):
    many = write_jsonl(
        tmp_path / "many.jsonl", [colour(f"thing {i}", f"c{i}") for i in range(MAX_CHOICES + 5)]
    )
    rows = [colour(*p) for p in COLOURS] * 7
    csv_file = tmp_path / "colours.csv"
    with csv_file.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "answer"])  # the prompts hold a newline: quoted fields
        writer.writeheader()
        writer.writerows(rows)
    s = lm_files_suite(
        files[1],
        [TaskFiles("many", many), TaskFiles("colours", files[3]), TaskFiles("csv", csv_file)],
        scoring="auto",
        max_len=MAX_LEN,
    )
    assert s.info["scoring"] == {"many": "exact", "colours": "loglik", "csv": "loglik"}
    for split in ("train", "val", "test"):  # the same rows as the JSONL file, carved alike
        assert torch.equal(s.task("csv").split(split).x, s.task("colours").split(split).x)


def test_lora_training_on_the_suite_writes_the_plain_models_names(suite, files):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(steps=2, batch_size=4, eval_every=2, lora=LoraSettings(r=2, alpha=2))
    update = train_update(suite, "colours", cfg).update
    plain = dict(AutoModelForCausalLM.from_pretrained(files[1]).named_parameters())
    assert update.kind == "lora" and set(update.deltas) <= set(plain)
    assert {n.split(".")[-2] for n in update.deltas} == set(suite.lora_targets)


def one_line_error(match, *args, **kwargs):
    with pytest.raises(DataError, match=match) as e:
        lm_files_suite(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_a_one_line_error_naming_the_file_and_the_row(files, tmp_path):
    model = files[1]
    rows = [colour(*p) for p in COLOURS] * 3
    bad = write_jsonl(
        tmp_path / "missing.jsonl", [*rows[:2], {"prompt": "Q: the colour of coal?\nA:"}, *rows]
    )
    one_line_error(rf"{bad}:3: missing column 'answer'", model, [TaskFiles("t", bad)])

    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("prompt,label\nQ,A\n")
    one_line_error(rf"{csv_file}:1: missing column 'answer'", model, [TaskFiles("t", csv_file)])

    empty = tmp_path / "empty_val"
    write_jsonl(empty / "train.jsonl", rows)
    write_jsonl(empty / "test.jsonl", rows)
    (empty / "validation.jsonl").write_text("")
    one_line_error(rf"{empty / 'validation.jsonl'}: the val split is empty", model, [TaskFiles("t", empty)])

    tiny = write_jsonl(tmp_path / "tiny.jsonl", rows[:2])
    one_line_error(rf"{tiny}: the train split is empty", model, [TaskFiles("t", tiny)])

    many = [colour(f"thing {i}", f"c{i}") for i in range(MAX_CHOICES + 5)]
    many_file = write_jsonl(tmp_path / "many.jsonl", many)
    msg = one_line_error(rf"{many_file}:{MAX_CHOICES + 1}: task 'many' has more than 20 distinct", model,
                         [TaskFiles("many", many_file)], scoring="loglik")  # fmt: skip
    assert "use scoring 'exact'" in msg

    long = write_jsonl(tmp_path / "long.jsonl", [*rows, colour("coal", " black" * 30)])
    one_line_error(rf"{long}:10: prompt \+ answer \+ EOS is \d+ tokens, over max_len=32", model,
                   [TaskFiles("t", long)], max_len=MAX_LEN)  # fmt: skip

    empty_prompt = write_jsonl(tmp_path / "empty-prompt.jsonl", [*rows, {"prompt": "", "answer": " red"}])
    one_line_error(rf"{empty_prompt}:10: the prompt has no tokens", model, [TaskFiles("t", empty_prompt)])

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{oops\n")
    one_line_error(rf"{broken}:2: not JSON", model, [TaskFiles("t", broken)])
    number = write_jsonl(tmp_path / "number.jsonl", [*rows, {"prompt": 3, "answer": "x"}])
    one_line_error(rf"{number}:10: 'prompt' must be a string", model, [TaskFiles("t", number)])
    (tmp_path / "rows.txt").write_text("prompt answer\n")
    one_line_error(
        rf"{tmp_path / 'rows.txt'}: unknown data format '.txt'",
        model,
        [TaskFiles("t", tmp_path / "rows.txt")],
    )

    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    datasets.Dataset.from_list([{"prompt": "p", "reply": "a"}] * 4).save_to_disk(str(tmp_path / "ds"))
    one_line_error(
        rf"{tmp_path / 'ds'} \[all\]: missing column 'answer'", model, [TaskFiles("t", tmp_path / "ds")]
    )

    with pytest.raises(DataError, match="not a causal LM"):
        lm_files_suite(tmp_path, [TaskFiles("t", files[3])])
    with pytest.raises(ConfigError, match="scoring 'top1'"):
        lm_files_suite(model, [TaskFiles("t", files[3])], scoring="top1")


def test_the_demo_path_runs_on_the_files_suite(suite, tmp_path, monkeypatch):
    """protect → merge → evaluate on the files suite: the pipeline scores with the tasks' own metrics."""
    from trap2.demo import run_demo
    from trap2.pipeline import DemoConfig
    from trap2.suites import _BUILT

    monkeypatch.setitem(_BUILT, "math", suite)  # get_suite("math") is this suite, as tests/test_math.py does
    cfg = DemoConfig(
        suite="math",
        train=TrainConfig(steps=3, batch_size=4, eval_every=3, lora=LoraSettings(r=2, alpha=2)),
        methods=("ta",),
        spaces=("full",),
        extra_searches=(),
        scales=(0.5, 1.0, 2.0),
    )
    report = run_demo(cfg, tmp_path)
    backbone = suite.make_backbone()
    assert report["target"] == "capitals" and report["tasks"] == ["capitals", "colours"]
    for name in report["tasks"]:
        assert report["zero_shot"][name] == pytest.approx(accuracy(backbone, suite.task(name), "test"))
    assert {a["protected"] for a in report["attacks"]} == {False, True}
    accs = [v for a in report["attacks"] for v in a["acc"].values()] + report["scaling_curve"]["protected"]
    assert all(0.0 <= v <= 1.0 for v in accs)
