"""End to end: ``trap2 audit --base MODEL_DIR --task NAME=ADAPTER:DATA`` on tiny random HF models saved to
tmp_path, with adapters trained here as a publisher would — PEFT LoRA on the plain transformers model with
transformers' ``Trainer``, the protected one with ``trap2.hf.Trap2Trainer`` — and data files written here
in each format the files suite reads (JSONL, CSV text pairs, ImageFolder trees with and without split
folders, a ``datasets`` save_to_disk folder).

Each audit must write its report, show the protected adapter's scaling curve collapsed off s = 1 and the
plain adapter's not, and hold the merge matrix for both pools (every adapter given: nothing trained; the
docs/audit.md form, where the audit trains the protected task's plain reference, and ``trap2 bench --base`` run
too). Bad input must stop the command with a one-line error naming the file (and the row) before anything
is written. The adapters are trained on rows drawn apart from the audit's data (another seed)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from file_helpers import run_cli, write_csv, write_jsonl
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn

from trap2.suites.files import TaskFiles, files_suite

CLASSES = {
    "mood": {
        "pos": "good great nice fine happy lovely",
        "neg": "bad awful poor sad ugly grim",
        "mid": "plain okay fair average usual moderate",
    },
    "topic": {
        "sport": "ball goal match team coach score",
        "food": "bread soup rice cake meal taste",
        "tech": "phone code chip robot laptop app",
    },
}
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite", "today", "my"]
SCALES = [0.5, 1.0, 2.0]
AUDIT_YAML = f"extra_searches: []\nscales: {SCALES}\n"  # the curve at 0.5, 1, 2; global searches only
METHODS = ("ta", "ties")
STEPS, LR = 150, 1e-2  # LoRA steps of every adapter (batch 16)
# Trap²'s λ, enough to collapse the curve of these tiny models within STEPS: λ goes with the loss scale,
# which the prototype heads' cosine logits (× 50) make larger
LAMBDA = {"own head": 0.3, "prototypes": 0.1, "image": 0.5}  # image: at 0.3 s = 2 kept 2/3 on an AMD EPYC


# --- data ---------------------------------------------------------------------------------------------


def sentences(task, n, seed):
    """``n`` rows per class of ``task``: three filler words and two words of the class, shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in CLASSES[task].items():
        for _ in range(n):
            w = [*rng.choice(FILLER, 3), *rng.choice(words.split(), 2)]
            rng.shuffle(w)
            rows.append({"text": " ".join(w), "label": label})
    return rows


def pairs(task, n, seed):
    """Text pairs: the class sentence as ``text_a``, a filler sentence as ``text_b``."""
    rng = np.random.default_rng(seed + 100)
    return [
        {"text_a": r["text"], "text_b": " ".join(rng.choice(FILLER, 3)), "label": r["label"]}
        for r in sentences(task, n, seed)
    ]


def label_ids(rows, task):
    names = sorted(CLASSES[task])  # the suite maps class names to ids in sorted order
    return [names.index(r["label"]) for r in rows]


IMAGE_CLASSES = {
    "colour": ("blue", "green", "red"),
    "light": ("bright", "dark"),
}


def image(task, label, rng):
    """A 16×16 RGB image whose class shows: the dominant channel (colour) or the brightness (light)."""
    if task == "colour":
        img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        img[..., 2 - IMAGE_CLASSES["colour"].index(label)] = 220  # blue → channel 2, red → 0
        return img
    lo, hi = (170, 255) if label == "bright" else (0, 85)
    return rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)


def image_folder(root, task, n, seed):
    """``root/<class>/<i>.png``, ``n`` per class."""
    rng = np.random.default_rng(seed)
    for c in IMAGE_CLASSES[task]:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(image(task, c, rng)).save(root / c / f"{i}.png")
    return root


# --- models -------------------------------------------------------------------------------------------


def word_tokenizer(folder):
    """A word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP], token types) over the tests' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in CLASSES.values() for ws in t.values() for w in ws.split()} | set(FILLER))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    tok.save_pretrained(folder)
    return tok


def bert_config(**kw):
    from transformers import BertConfig

    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertConfig(
        vocab_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2, **{**sizes, **kw},
    )  # fmt: skip


def save_bert_classifier(folder, seed=0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    BertForSequenceClassification(bert_config(num_labels=3, **kw)).save_pretrained(folder)
    return word_tokenizer(folder)


def save_vit_classifier(folder, seed=0):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    ViTForImageClassification(cfg).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    processor.save_pretrained(folder)
    return processor


def lora(model, seed, targets):
    torch.manual_seed(seed)  # the LoRA A's initialisation
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))


class PooledHead(nn.Module):
    """A (PEFT-wrapped) text encoder without a classifier, trained under a frozen head on its masked-mean
    features — the features and head trap2's files suite scores an encoder with."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, L, d)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def fit(model, examples, out, *, seed, lam=None, module=None, task=None, steps=STEPS):
    """Train ``model`` with transformers' Trainer (plain) or Trap2Trainer (``lam`` given) and save the
    adapter of ``module`` (default: the model) to ``out``: PEFT's save_pretrained, or save_update."""
    from transformers import Trainer, TrainingArguments

    from trap2.hf import Trap2Trainer, Trap2TrainingArguments

    args = dict(
        output_dir=str(out.parent / f"{out.name}-run"), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, seed=seed, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False,
    )  # fmt: skip
    module = model if module is None else module
    if lam is None:
        Trainer(model=model, args=TrainingArguments(**args), train_dataset=examples).train()
        module.save_pretrained(out)
    else:
        trainer = Trap2Trainer(
            model=model, args=Trap2TrainingArguments(**args, trap2_lambda=lam), train_dataset=examples
        )
        trainer.train()
        trainer.save_update(out, module=module, task=task)
    return out


def text_examples(tok, rows, task):
    enc = tok([r["text"] for r in rows], padding=True)
    ids = label_ids(rows, task)
    return [{"input_ids": a, "attention_mask": m, "labels": y} for a, m, y in zip(
        enc["input_ids"], enc["attention_mask"], ids, strict=True)]  # fmt: skip


# --- the CLI -------------------------------------------------------------------------------------------


def audit_args(base, update, tasks, out, config):
    """``trap2 audit UPDATE --base BASE --task NAME=ADAPTER:DATA ... --protected <first task>``, with a
    small matrix (ta and ties in the full space)."""
    specs = [a for name, (adapter, data) in tasks.items() for a in ("--task", f"{name}={adapter}:{data}")]
    return [
        "audit", update, "--base", base, *specs, "--protected", next(iter(tasks)),
        "--methods", ",".join(METHODS), "--spaces", "full", "--config", config, "--out", out, "--threads", "1",
    ]  # fmt: skip


def audit(monkeypatch, capsys, tmp_path, base, update, tasks):
    """Run the audit of ``update`` (the first task's protected adapter) and check what every audit must
    show: report written, nothing trained, the protected curve collapsed off s = 1 and the plain one not,
    the merge matrix for both pools. Returns the report."""
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT_YAML)
    out = tmp_path / "audit"
    code, stdout, err = run_cli(monkeypatch, capsys, *audit_args(base, update, tasks, out, config))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    target = next(iter(tasks))
    assert (out / "report.md").is_file() and "trap2 audit" in stdout
    assert report["target"] == target and report["tasks"] == list(tasks)
    assert report["audited"] == str(update) and report["audited_meta"]["task"] == target
    assert report["pool"] == {t: "given" for t in tasks} and not (out / "updates").exists()

    curve = report["scaling_curve"]
    assert curve["s"] == SCALES
    prot, plain = curve["protected"], curve["unprotected"]
    chance = 1.0 / len(CLASSES.get(target, IMAGE_CLASSES.get(target, ())))
    assert plain[1] >= chance + 0.35 and prot[1] >= chance + 0.35, curve  # both adapters learnt the task
    assert max(prot[0], prot[2]) <= chance + 0.15, curve  # Trap²: off s = 1 the adapter falls to chance
    assert (plain[0] + plain[2]) / 2 >= chance + 0.25, curve  # a plain LoRA keeps working when scaled
    assert report["standalone"]["protected"][target] == pytest.approx(prot[1])

    cells = {(a["method"], a["space"], a["protected"]) for a in report["attacks"]}
    assert cells == {(m, "full", p) for m in METHODS for p in (False, True)}  # both pools, each cell
    for a in report["attacks"]:
        assert set(a["acc"]) == {*tasks, "mean"} and all(0.0 <= v <= 1.0 for v in a["acc"].values())
    return report


# --- each kind of model ----------------------------------------------------------------------------------


def test_audit_a_sequence_classifier_with_jsonl_and_a_datasets_folder(tmp_path, monkeypatch, capsys):
    """BERT with its own classifier head; task mood from a JSONL file (val/test carved), task topic from
    a DatasetDict saved with save_to_disk (its own splits)."""
    datasets = pytest.importorskip("datasets")
    from transformers import BertForSequenceClassification

    base = tmp_path / "bert-cls"
    tok = save_bert_classifier(base)
    mood = write_jsonl(tmp_path / "mood.jsonl", sentences("mood", 60, seed=1))
    topic = tmp_path / "topic-ds"
    rows = sentences("topic", 30, seed=1)
    datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows[i::3]) for i, s in enumerate(("train", "validation", "test"))}
    ).save_to_disk(str(topic))

    def adapter(task, seed, lam=None):
        model = lora(BertForSequenceClassification.from_pretrained(base), seed, ("query", "value", "dense"))
        examples = text_examples(tok, sentences(task, 60, seed=0), task)
        return fit(model, examples, tmp_path / f"{task}-{seed}", seed=seed, lam=lam, task=task)

    lam = LAMBDA["own head"]
    plain_mood, plain_topic, protected = adapter("mood", 0), adapter("topic", 1), adapter("mood", 2, lam)
    report = audit(
        monkeypatch,
        capsys,
        tmp_path,
        base,
        protected,
        {"mood": (plain_mood, mood), "topic": (plain_topic, topic)},
    )
    assert report["suite"] == "files-bert-cls"

    # docs/audit.md's command: the protected adapter given as its task's, whose plain reference the audit
    # trains on the task's data (trap2's own loop on the files suite) while the other task's is given
    out = tmp_path / "audit-readme"
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", "--base", base, "--task", f"mood={protected}:{mood}",
        "--task", f"topic={plain_topic}:{topic}", "--protected", "mood", "--steps", "60", "--methods", "ta",
        "--spaces", "full", "--config", tmp_path / "audit.yaml", "--out", out, "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    again = json.loads((out / "report.json").read_text())
    assert again["pool"] == {"mood": "trained", "topic": "given"} and any((out / "updates").iterdir())
    assert again["scaling_curve"]["protected"] == report["scaling_curve"]["protected"]  # the same adapter
    assert again["standalone"]["unprotected"]["topic"] == report["standalone"]["unprotected"]["topic"]
    assert again["standalone"]["unprotected"]["mood"] > 0.5  # the trained reference learnt the task


def test_audit_an_encoder_with_prototype_heads_on_csv_pairs(tmp_path, monkeypatch, capsys):
    """A plain BERT encoder: no head of its own, so the suite scores it with frozen class-mean prototypes
    of its W0 features; the publisher trains under those heads (files_suite's, the library API) with the
    pairs text_a/text_b of a CSV file."""
    from transformers import BertModel

    base = tmp_path / "bert"
    torch.manual_seed(1)
    BertModel(bert_config()).save_pretrained(base)
    word_tokenizer(base)
    data = {t: write_csv(tmp_path / f"{t}.csv", pairs(t, 60, seed=1)) for t in ("mood", "topic")}
    suite = files_suite(base, [TaskFiles(t, d) for t, d in data.items()])  # the audit's own heads

    def adapter(task, seed, lam=None):
        encoder = lora(BertModel.from_pretrained(base), seed, ("query", "value", "dense"))
        split = suite.task(task).train
        x = split.x[:, :, : int(split.x[:, 1].sum(1).max())]  # (N, 3, L): ids, mask, token types
        examples = [
            {"input_ids": a, "attention_mask": m, "token_type_ids": t, "labels": y}
            for (a, m, t), y in zip(x, split.y, strict=True)
        ]
        model = PooledHead(encoder, suite.task(task).head)
        return fit(
            model, examples, tmp_path / f"{task}-{seed}", seed=seed, lam=lam, module=encoder, task=task
        )

    lam = LAMBDA["prototypes"]
    plain_mood, plain_topic, protected = adapter("mood", 0), adapter("topic", 1), adapter("mood", 2, lam)
    tasks = {t: (a, data[t]) for t, a in (("mood", plain_mood), ("topic", plain_topic))}
    report = audit(monkeypatch, capsys, tmp_path, base, protected, tasks)
    assert report["audited_meta"]["base_fingerprint"]  # save_update recorded the base it was made on


def test_audit_a_vit_on_image_folders(tmp_path, monkeypatch, capsys):
    """A ViT image classifier with its own head and image processor; task colour from an ImageFolder tree
    (val/test carved), task light from a tree with train/val/test folders."""
    from transformers import ViTForImageClassification

    from trap2.hf.targets import default_lora_targets

    base = tmp_path / "vit"
    processor = save_vit_classifier(base)
    # explicit splits with 10 test images per class: a 3-image test split scored in thirds, and on
    # another CPU the protected adapter's 2/3 at s = 1 fell under the line
    colour, light = tmp_path / "colour", tmp_path / "light"
    for i, (split, n) in enumerate((("train", 12), ("val", 4), ("test", 10))):
        image_folder(colour / split, "colour", n, seed=1 + i)
        image_folder(light / split, "light", n, seed=10 + i)

    def adapter(task, seed, lam=None):
        hf = ViTForImageClassification.from_pretrained(base)
        model = lora(hf, seed, default_lora_targets(hf))
        rng = np.random.default_rng(0)  # the publisher's own training images
        names = IMAGE_CLASSES[task]
        images = [(Image.fromarray(image(task, c, rng)), y) for y, c in enumerate(names) for _ in range(20)]
        pixels = processor([im for im, _ in images], return_tensors="pt")["pixel_values"]
        examples = [{"pixel_values": p, "labels": y} for p, (_, y) in zip(pixels, images, strict=True)]
        return fit(model, examples, tmp_path / f"{task}-{seed}", seed=seed, lam=lam, task=task)

    plain_colour, plain_light, protected = (
        adapter("colour", 0), adapter("light", 1), adapter("colour", 2, LAMBDA["image"])
    )  # fmt: skip
    tasks = {"colour": (plain_colour, colour), "light": (plain_light, light)}
    report = audit(monkeypatch, capsys, tmp_path, base, protected, tasks)
    assert report["suite"] == "files-vit"


# --- bad input -----------------------------------------------------------------------------------------


def random_adapter(model, folder, seed, targets):
    """A PEFT LoRA adapter with random B (so it changes the model), saved without training."""
    model = lora(model, seed, targets)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Model folders, good data and adapters, and every bad input (a name → its path)."""
    from transformers import BertForSequenceClassification, ViTForImageClassification

    root = tmp_path_factory.mktemp("zoo")
    z = {"root": root, "bert": root / "bert-cls", "other": root / "other-cls", "wide": root / "wide-cls"}
    tok = save_bert_classifier(z["bert"])
    save_bert_classifier(z["other"], seed=5)  # the same architecture, other weights
    save_bert_classifier(z["wide"], hidden_size=32, intermediate_size=64)
    targets = ("query", "value")
    for task, seed in (("mood", 0), ("topic", 1)):
        z[task] = write_jsonl(root / f"{task}.jsonl", sentences(task, 10, seed=1))
        hf = BertForSequenceClassification.from_pretrained(z["bert"])
        z[f"{task}-adapter"] = random_adapter(hf, root / f"{task}-adapter", seed, targets)
    # a release for the other base, as Trap2Trainer.save_update writes it (it records the base)
    hf = BertForSequenceClassification.from_pretrained(z["other"])
    examples = text_examples(tok, sentences("topic", 4, seed=0), "topic")
    z["other-adapter"] = fit(lora(hf, 2, targets), examples, root / "other-adapter", seed=2, lam=0.3, steps=2)
    hf = BertForSequenceClassification.from_pretrained(z["wide"])
    z["wide-adapter"] = random_adapter(hf, root / "wide-adapter", 3, targets)

    rows = sentences("mood", 10, seed=2)
    rows[4] = {"txt": rows[4]["text"], "label": rows[4]["label"]}  # line 5
    z["missing-column"] = write_jsonl(root / "missing-column.jsonl", rows)
    rows = sentences("mood", 10, seed=2)
    rows = [{"text": r["text"], "label": y} for r, y in zip(rows, label_ids(rows, "mood"), strict=True)]
    rows[6]["label"] = 3  # line 7: the model has 3 labels
    z["out-of-range"] = write_jsonl(root / "out-of-range.jsonl", rows)
    z["empty-split"] = root / "empty-split"
    write_jsonl(z["empty-split"] / "train.jsonl", sentences("mood", 10, seed=3))
    (z["empty-split"] / "validation.jsonl").write_text("\n")

    z["vit"] = root / "vit"
    save_vit_classifier(z["vit"])
    hf = ViTForImageClassification.from_pretrained(z["vit"])
    z["colour-adapter"] = random_adapter(hf, root / "colour-adapter", 4, ("q_proj", "v_proj"))
    z["light"] = image_folder(root / "light", "light", 6, seed=1)
    z["broken-images"] = image_folder(root / "broken-images", "colour", 6, seed=1)
    (z["broken-images"] / "red" / "broken.png").write_bytes(b"not a png")
    return z


BAD = {
    # case: (base, [(task, adapter, data)], the error's text after "error: ")
    "missing column": (
        "bert", [("mood", "mood-adapter", "missing-column"), ("topic", "topic-adapter", "topic")],
        "{missing-column}:5: missing column 'text'",
    ),
    "label out of range": (
        "bert", [("mood", "mood-adapter", "out-of-range"), ("topic", "topic-adapter", "topic")],
        "{out-of-range}:7: label 3 is out of range for a model with 3 labels",
    ),
    "adapter for another base": (
        "bert", [("mood", "mood-adapter", "mood"), ("topic", "other-adapter", "topic")],
        "{other-adapter}: made for base ",
    ),
    "adapter for another architecture": (
        "bert", [("mood", "mood-adapter", "mood"), ("topic", "wide-adapter", "topic")],
        "{wide-adapter}: tensor 'bert.encoder.layer.0.attention.self.query.weight' has shape (32, 32)",
    ),
    "unreadable image": (
        "vit", [("colour", "colour-adapter", "broken-images"), ("light", "", "light")],
        "{broken-images}/red/broken.png: not a readable image",
    ),
    "empty split": (
        "bert", [("mood", "mood-adapter", "empty-split"), ("topic", "topic-adapter", "topic")],
        "{empty-split}/validation.jsonl: empty split",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_stops_the_audit_with_one_line_naming_the_file(case, zoo, monkeypatch, capsys, tmp_path):
    base, tasks, message = BAD[case]
    specs = [a for t, adapter, data in tasks for a in ("--task", f"{t}={zoo.get(adapter, '')}:{zoo[data]}")]
    out = tmp_path / "audit"
    code, _, err = run_cli(
        monkeypatch, capsys, "audit", "--base", zoo[base], *specs, "--protected", tasks[0][0],
        "--methods", "ta", "--spaces", "full", "--out", out,
    )  # fmt: skip
    want = "error: " + message.format_map(zoo)
    assert code == 2 and err.startswith(want) and err.count("\n") == 1, err
    assert not out.exists()  # refused before anything is trained or written


def test_a_text_longer_than_the_models_positions_is_truncated(zoo, tmp_path):
    """The suite's max_len (128 by default, as the CLI builds it) is capped at the model's 64 positions:
    a 100-word row is cut, not an index error in the middle of the audit."""
    from trap2.eval import accuracy

    rows = sentences("mood", 10, seed=4)
    rows[0]["text"] = " ".join(["good"] * 100)
    suite = files_suite(zoo["bert"], [TaskFiles("t", write_jsonl(tmp_path / "long.jsonl", rows))])
    task = suite.task("t")
    assert suite.info["max_len"] == 64 and {task.split(s).x.shape[-1] for s in ("train", "val", "test")} == {
        64
    }
    assert (
        int(max(task.split(s).x[:, 1].sum(1).max() for s in ("train", "val", "test"))) == 64
    )  # the long row
    backbone = suite.make_backbone()
    for split in ("train", "val", "test"):
        assert 0.0 <= accuracy(backbone, task, split) <= 1.0


def test_bench_on_a_model_folder_trains_the_protected_update_over_the_given_pool(
    zoo, monkeypatch, capsys, tmp_path
):
    """``trap2 bench --base``: the files suite's target trained plain and protected by trap2's loop, the
    other task's adapter given; the bench table and the target's report written."""
    (tmp_path / "bench.yaml").write_text(
        f"modes: [lora]\nlora: {{mode: lora, steps: 30, eval_every: 30}}\nmethods: [ta]\nscales: {SCALES}\nthreats: none\n"
    )
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "bench", "--base", zoo["bert"], "--task", f"mood=:{zoo['mood']}",
        "--task", f"topic={zoo['topic-adapter']}:{zoo['topic']}", "--protected", "mood",
        "--config", tmp_path / "bench.yaml", "--out", out, "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "bench.json").read_text())["targets"] == ["mood"] and "# trap2 bench" in stdout
    report = json.loads((out / "lora" / "mood" / "report.json").read_text())
    assert report["suite"] == "files-bert-cls" and report["pool"] == {"mood": "trained", "topic": "given"}
    assert {(a["method"], a["protected"]) for a in report["attacks"]} == {("ta", False), ("ta", True)}
    trained = sorted(
        p.name.removeprefix("files-bert-cls-").split("-")[:3] for p in (out / "updates").iterdir()
    )
    assert trained == [["mood", "lora", "none"], ["mood", "lora", "trap2"]]  # topic's adapter was given
