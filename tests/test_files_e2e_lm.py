"""End to end on a causal LM: ``trap2 audit --base LLAMA_DIR --task NAME=ADAPTER:DATA`` on a tiny random
Llama saved to tmp_path, with prompt/answer JSONL files written here and adapters trained as a publisher
would — PEFT LoRA on the plain ``LlamaForCausalLM`` with transformers' ``Trainer`` (the loss on the answer
tokens only), the protected one with ``trap2.hf.Trap2Trainer`` and released with ``save_update(task=)``.

Each task maps a prompt word to one of three answer words, so ``--scoring loglik`` (multiple choice among
the task's answers) applies; ``--scoring exact`` scores the greedy generation. Each audit must write its
report, show the protected adapter's scaling curve collapsed off s = 1 and the plain adapter's not, hold
the merge matrix for both pools, and train nothing (every task has its adapter)."""

import json

import pytest
import torch
from file_helpers import run_cli
from peft import LoraConfig, get_peft_model
from test_files_e2e import write_jsonl
from tiny_models import tiny_llama

from trap2.data.prepare import weights_fingerprint

pytestmark = pytest.mark.slow  # the module: three adapters trained (~8 s) and three audits (~2–3 s each)

# task -> answer -> the prompt words whose answer it is
TASKS = {
    "colour": {" red": "apple cherry tomato", " yellow": "banana lemon corn", " green": "lime pea leaf"},
    "sound": {" woof": "dog puppy wolf", " meow": "cat kitten lion", " moo": "cow calf ox"},
}
PROMPT = {"colour": "the colour of {}:", "sound": "the sound of {}:"}
SCALES = [0.5, 1.0, 2.0]
AUDIT_YAML = f"extra_searches: []\nscales: {SCALES}\n"  # the curve at 0.5, 1, 2; global searches only
METHODS = ("ta", "ties")
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")  # the publisher's LoRA targets (a subset: any apply)
PLAIN_STEPS, LR = 40, 1e-2  # batch 16 of 18 examples
# Trap²: λ·√s < 1 over s ≤ 2 (weight 1/√s, the paper's LLM weighting), so the first steps still learn
# the task; with two scales a step, 200 steps took both sides of s = 1 to chance or below (seeds 2–5)
LAMBDA, PROTECTED_STEPS, N_SCALES = 0.3, 200, 2


def rows(task, repeat):
    """Every (prompt word, answer) pair of ``task``, ``repeat`` times each."""
    pairs = [(w, a) for a, words in TASKS[task].items() for w in words.split()]
    return [{"prompt": PROMPT[task].format(w), "answer": a} for w, a in pairs] * repeat


def save_llama(folder):
    """The tiny Llama and a BPE tokenizer whose merges make each word of the tasks one or a few tokens."""
    texts = [r["prompt"] + r["answer"] for t in TASKS for r in rows(t, 1)]
    return tiny_llama(folder, texts * 20, vocab_size=320, initializer_range=0.1)


def examples(tok, task):
    """The publisher's own training examples: the prompt (with BOS), the answer and EOS; labels -100 on
    the prompt and the padding (right padding to the longest example)."""
    encoded = []
    for r in rows(task, 2):
        prompt = tok(r["prompt"])["input_ids"]
        answer = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        encoded.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in encoded)
    return [
        {
            "input_ids": ids + [tok.pad_token_id] * (width - len(ids)),
            "attention_mask": [1] * len(ids) + [0] * (width - len(ids)),
            "labels": labels + [-100] * (width - len(ids)),
        }
        for ids, labels in encoded
    ]


def adapter(base, tok, task, out, seed, protected=False):
    """A LoRA adapter for ``task`` on the plain model: transformers' Trainer and PEFT's save_pretrained, or
    (``protected``) Trap2Trainer and save_update with the task."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from trap2.hf import Trap2Trainer, Trap2TrainingArguments

    torch.manual_seed(seed)  # the LoRA A's initialisation
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    args = dict(
        output_dir=str(out.parent / f"{out.name}-run"), max_steps=PLAIN_STEPS, per_device_train_batch_size=16,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, seed=seed, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = examples(tok, task)
    if not protected:
        Trainer(model=model, args=TrainingArguments(**args), train_dataset=data).train()
        model.save_pretrained(out)
        return out
    args.update(max_steps=PROTECTED_STEPS)
    targs = Trap2TrainingArguments(
        **args, trap2_lambda=LAMBDA, trap2_weight="inv_sqrt", trap2_n_samples=N_SCALES
    )
    trainer = Trap2Trainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    return trainer.save_update(out, task=task)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The model folder, a JSONL file per task (val and test carved by the audit), a plain adapter per task
    and the protected colour adapter (each trained on its own examples)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("e2e_lm")
    base = save_llama(root / "llama")
    tok = AutoTokenizer.from_pretrained(base)
    z = {"root": root, "base": base}
    for seed, task in enumerate(TASKS):
        z[task] = write_jsonl(root / f"{task}.jsonl", rows(task, 10))
        z[f"{task}-plain"] = adapter(base, tok, task, root / f"{task}-plain", seed)
    z["protected"] = adapter(base, tok, "colour", root / "colour-protected", 2, protected=True)
    return z


def audit(zoo, tmp_path, monkeypatch, capsys, scoring):
    """``trap2 audit PROTECTED --base LLAMA --task colour=PLAIN:DATA --task sound=PLAIN:DATA --protected
    colour --scoring SCORING`` and what every audit must show; returns the report."""
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT_YAML)
    out = tmp_path / "audit"
    specs = [a for t in TASKS for a in ("--task", f"{t}={zoo[f'{t}-plain']}:{zoo[t]}")]
    code, stdout, err = run_cli(
        monkeypatch, capsys, "audit", zoo["protected"], "--base", zoo["base"], *specs,
        "--protected", "colour", "--scoring", scoring, "--methods", ",".join(METHODS), "--spaces", "full",
        "--config", config, "--out", out, "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and "trap2 audit" in stdout
    assert report["suite"] == "files-llama" and report["target"] == "colour"
    assert report["tasks"] == list(TASKS)
    meta = report["audited_meta"]
    assert report["audited"] == str(zoo["protected"]) and meta["task"] == "colour"
    assert meta["base_fingerprint"] == weights_fingerprint(zoo["base"])  # save_update recorded the base
    assert report["pool"] == {t: "given" for t in TASKS} and not (out / "updates").exists()  # none trained

    curve = report["scaling_curve"]
    assert curve["s"] == SCALES
    prot, plain = curve["protected"], curve["unprotected"]
    assert prot[1] >= 0.85 and plain[1] >= 0.85, curve  # both adapters answer the task at s = 1
    assert report["standalone"]["protected"]["colour"] == pytest.approx(prot[1])
    assert min(plain[0], plain[2]) >= 0.85, curve  # a plain LoRA keeps working when scaled

    cells = {(a["method"], a["space"], a["protected"]) for a in report["attacks"]}
    assert cells == {(m, "full", p) for m in METHODS for p in (False, True)}  # both pools, each cell
    for a in report["attacks"]:
        assert set(a["acc"]) == {*TASKS, "mean"} and all(0.0 <= v <= 1.0 for v in a["acc"].values())
    return report


def test_audit_a_causal_lm_scored_by_answer_loglik(zoo, tmp_path, monkeypatch, capsys):
    """Multiple choice among each task's three answers: chance is 1/3, and the protected adapter, right at
    s = 1, is at or below chance at s = 0.5 and 2."""
    report = audit(zoo, tmp_path, monkeypatch, capsys, "loglik")
    prot = report["scaling_curve"]["protected"]
    assert max(prot[0], prot[2]) <= 0.5, report["scaling_curve"]
    assert report["zero_shot"]["sound"] <= 0.5 < report["standalone"]["unprotected"]["sound"]


def test_audit_a_causal_lm_scored_by_exact_match(zoo, tmp_path, monkeypatch, capsys):
    """Exact match of the greedy generation: the protected adapter answers nothing off s = 1."""
    report = audit(zoo, tmp_path, monkeypatch, capsys, "exact")
    prot = report["scaling_curve"]["protected"]
    assert max(prot[0], prot[2]) <= 0.15, report["scaling_curve"]
    assert report["zero_shot"] == {t: 0.0 for t in (*TASKS, "mean")}  # the random model answers nothing


def test_audit_trains_the_protected_tasks_plain_reference(zoo, tmp_path, monkeypatch, capsys):
    """docs/audit.md's form: the protected adapter given as its task's adapter (``--scoring`` left to auto:
    loglik, three answers), whose plain reference the audit trains with trap2's loop on the task's JSONL
    file; the other task's adapter is given."""
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT_YAML)
    out = tmp_path / "audit"
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", "--base", zoo["base"],
        "--task", f"colour={zoo['protected']}:{zoo['colour']}",
        "--task", f"sound={zoo['sound-plain']}:{zoo['sound']}", "--protected", "colour", "--steps", "40",
        "--methods", "ta", "--spaces", "full", "--config", config, "--out", out, "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["pool"] == {"colour": "trained", "sound": "given"}
    assert [p.name.split("-")[:5] for p in (out / "updates").iterdir()] == [
        ["files", "llama", "colour", "lora", "none"]
    ]  # the plain reference only
    curve = report["scaling_curve"]
    prot, plain = curve["protected"], curve["unprotected"]
    assert prot[1] >= 0.85 and max(prot[0], prot[2]) <= 0.5, curve
    assert plain[1] >= 0.85 and (plain[0] + plain[2]) / 2 >= 0.75, curve  # the trained reference learnt it
    assert {(a["method"], a["protected"]) for a in report["attacks"]} == {("ta", False), ("ta", True)}
