"""files_suite on tiny random HF models saved by the tests (BERT-style classifier and encoder, ViT with
and without its own head, CLIP vision) with data files the tests write (JSONL, CSV, ImageFolder,
datasets save_to_disk): shapes, heads and fingerprint; splits carved the same for the same seed and
given splits used; an adapter trained with PEFT on the plain HF model applies to the suite's backbone
exactly; every bad input a one-line DataError naming the file and the row."""

import hashlib
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from file_helpers import write_csv, write_jsonl
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.func import functional_call

from trap2.data.files import carve, read_data
from trap2.errors import ConfigError, DataError
from trap2.eval.evaluate import accuracy, base_state
from trap2.suites.base import CosineHead
from trap2.suites.files import Logits, TaskFiles, files_suite
from trap2.updates import apply_delta, load_update

WORDS = {
    "pos": "good great nice fine happy lovely",
    "neg": "bad awful poor sad ugly grim",
    "mid": "plain okay fair so so average",
}
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite"]
MAX_LEN = 12


def sentences(n, seed=0):
    """``n`` short sentences per class, each with a word of its class among filler words."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n):
            w = list(rng.choice(FILLER, 4)) + [rng.choice(words.split())]
            rng.shuffle(w)
            rows.append({"text": " ".join(w), "label": label})
    return rows


def tiny_tokenizer(folder):
    """A word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP], token types) over the test's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for ws in WORDS.values() for w in ws.split()} | set(FILLER))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # as BERT's tokenizer
    )
    tok.save_pretrained(folder)
    return tok


def bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # outputs far enough apart for an adapter's change to show
        **kw,
    )


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert-cls")
    torch.manual_seed(0)
    BertForSequenceClassification(bert_config(num_labels=3)).save_pretrained(folder)
    tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def bert_plain(tmp_path_factory):
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(1)
    BertModel(bert_config()).save_pretrained(folder)
    tiny_tokenizer(folder)
    return folder


COLOURS = ("blue", "green", "red")


def image_folder(root, n=5, seed=0, size=(20, 24)):
    """``root/<colour>/<i>.png``: noisy images whose dominant channel is the class."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(COLOURS):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
            img[..., 2 - ci] = 200  # blue → channel 2, green → 1, red → 0
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def vit_config(**kw):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


@pytest.fixture(scope="module")
def vit_cls(tmp_path_factory):
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit-cls")
    torch.manual_seed(0)
    # the model's own class order differs from the sorted folder names: its label2id must be used
    names = ("red", "blue", "green")
    cfg = vit_config(
        num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("img") / "colours", n=6)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- text with the model's own head ---------------------------------------------------------------


def test_text_classifier_with_its_own_head(bert_cls, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    data = write_jsonl(tmp_path / "sent.jsonl", sentences(10))
    suite = files_suite(bert_cls, [TaskFiles("sent", data)], max_len=MAX_LEN)
    task = suite.task("sent")
    assert suite.info["kind"] == "text-head" and suite.task_names == ["sent"]
    assert suite.fingerprint == sha256(bert_cls / "model.safetensors")
    assert isinstance(task.head, Logits) and not list(task.head.parameters()) and task.n_classes == 3
    n = {s: len(task.split(s)) for s in ("train", "val", "test")}
    assert sum(n.values()) == 30 and n["val"] == n["test"] == 6  # round(0.15 · 10) per class
    assert task.train.x.shape == (n["train"], 2, MAX_LEN) and task.train.x.dtype == torch.int64
    assert suite.info["tasks"]["sent"]["classes"] == ["mid", "neg", "pos"]  # sorted names → ids

    hf = BertForSequenceClassification.from_pretrained(bert_cls).eval()
    backbone = suite.make_backbone()
    assert [n for n, _ in backbone.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert not any("classifier" in t or "pooler" in t for t in suite.lora_targets)
    assert suite.full_frozen == ("bert.embeddings.word_embeddings.",)

    # the suite's accuracy is the HF model's own argmax accuracy on the test rows
    tok = AutoTokenizer.from_pretrained(bert_cls)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    test_idx = carve([r["label"] for r in rows], [0.15, 0.15], 0, str(data))[2]
    texts = [rows[i]["text"] for i in test_idx]
    y = torch.tensor([["mid", "neg", "pos"].index(rows[i]["label"]) for i in test_idx])
    with torch.no_grad():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    assert torch.equal(task.test.y, y)
    assert accuracy(backbone, task, "test") == pytest.approx(float((logits.argmax(-1) == y).float().mean()))


def peft_bert_adapter(hf, folder, targets=("query", "value")):
    torch.manual_seed(2)
    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B ≠ 0: the adapter changes the outputs
    model.save_pretrained(folder)
    return model.eval()


def test_peft_adapter_on_the_sequence_classifier_applies_to_the_backbone(bert_cls, tmp_path):
    from transformers import BertForSequenceClassification

    peft_model = peft_bert_adapter(BertForSequenceClassification.from_pretrained(bert_cls), tmp_path / "ad")
    data = write_jsonl(tmp_path / "d.jsonl", sentences(6))
    suite = files_suite(bert_cls, [TaskFiles("t", data, tmp_path / "ad")], max_len=MAX_LEN)
    update = load_update(tmp_path / "ad")
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    assert (
        set(update.deltas) <= set(w0) and "bert.encoder.layer.0.attention.self.query.weight" in update.deltas
    )
    update.check_base(w0, suite.fingerprint)
    x = suite.task("t").test.x
    with torch.no_grad():
        ours = functional_call(backbone, apply_delta(w0, update.dense()), (x,))
        theirs = peft_model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        plain = backbone(x)
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(plain, theirs, atol=1e-3)
    assert suite.info["tasks"]["t"]["adapter"] == str(tmp_path / "ad")


def test_a_decoder_sequence_classifier_whose_child_is_named_model(tmp_path):
    """LlamaForSequenceClassification holds ``model`` and ``score``: the names stay, PEFT and trap2's
    own LoRA training reach the layers, and the logits are the HF model's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
    from trap2.training.loop import train_update

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(6)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "llama-cls")
    tiny_tokenizer(tmp_path / "llama-cls")
    data = write_jsonl(tmp_path / "d.jsonl", sentences(6))
    suite = files_suite(tmp_path / "llama-cls", [TaskFiles("t", data)], max_len=MAX_LEN)
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "llama-cls").eval()
    backbone = suite.make_backbone()
    assert [n for n, _ in backbone.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert suite.info["kind"] == "text-head" and isinstance(suite.task("t").head, Logits)
    x = suite.task("t").test.x
    with torch.no_grad():
        assert torch.allclose(backbone(x), hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits, atol=1e-5)
    train_cfg = TrainConfig(
        steps=2, batch_size=4, eval_every=2, warmup_steps=0, lora=LoraSettings(r=2, alpha=2),
        objective=ObjectiveConfig(name="none"),
    )  # fmt: skip
    update = train_update(suite, "t", train_cfg).update
    assert update.deltas and set(update.deltas) <= set(base_state(backbone))
    assert all(n.startswith("model.layers.") for n in update.deltas)


# --- a plain text encoder with prototype heads -----------------------------------------------------


def masked_mean(hidden, mask):
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def test_text_encoder_pairs_from_csv_with_prototype_heads(bert_plain, tmp_path):
    from transformers import AutoTokenizer, BertModel

    rows = [
        {"text_a": r["text"], "text_b": "the film", "label": ["pos", "neg", "mid"].index(r["label"])}
        for r in sentences(8)
    ]
    data = write_csv(tmp_path / "pairs.csv", rows, ["text_a", "text_b", "label"])
    suite = files_suite(bert_plain, [TaskFiles("pairs", data)], max_len=MAX_LEN, seed=3)
    task = suite.task("pairs")
    assert suite.info["kind"] == "text" and isinstance(task.head, CosineHead) and task.n_classes == 3
    assert task.train.x.shape[1:] == (3, MAX_LEN)  # ids, mask, token types
    assert int(task.train.x[:, 2].max()) == 1  # the second text's token types

    # prototypes: class means of the normalised masked-mean features of the HF encoder on train
    hf = BertModel.from_pretrained(bert_plain).eval()
    tok = AutoTokenizer.from_pretrained(bert_plain)
    read = {r["text_a"]: r for r in rows}
    train_rows = [read[tok.decode(ids[ids > 3].tolist()).split(" the film")[0]] for ids in task.train.x[:, 0]]
    enc = tok(
        [r["text_a"] for r in train_rows],
        [r["text_b"] for r in train_rows],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        feats = F.normalize(masked_mean(hf(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    y = torch.tensor([r["label"] for r in train_rows])
    assert torch.equal(task.train.y, y)
    protos = torch.stack([F.normalize(feats[y == c].mean(0), dim=-1) for c in range(3)])
    assert torch.allclose(task.head.prototypes, protos, atol=1e-5)
    assert suite.full_frozen == ("embeddings.word_embeddings.",)


def test_peft_adapter_on_the_plain_encoder_applies_to_the_backbone(bert_plain, tmp_path):
    from transformers import BertModel

    peft_model = peft_bert_adapter(BertModel.from_pretrained(bert_plain), tmp_path / "ad", ("query", "dense"))
    data = write_jsonl(tmp_path / "d.jsonl", sentences(6))
    suite = files_suite(bert_plain, [TaskFiles("t", data)], max_len=MAX_LEN)
    update = load_update(tmp_path / "ad")
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    assert set(update.deltas) <= set(w0) and "encoder.layer.1.output.dense.weight" in update.deltas
    x = suite.task("t").val.x
    with torch.no_grad():
        ours = functional_call(backbone, apply_delta(w0, update.dense()), (x,))
        n = int(x[:, 1].sum(1).max())
        theirs = masked_mean(
            peft_model(input_ids=x[:, 0, :n], attention_mask=x[:, 1, :n]).last_hidden_state, x[:, 1, :n]
        )
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_trap2_lora_training_runs_on_a_files_suite(bert_plain, tmp_path):
    from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
    from trap2.training.loop import train_update

    data = write_jsonl(tmp_path / "d.jsonl", sentences(6))
    suite = files_suite(bert_plain, [TaskFiles("t", data)], max_len=MAX_LEN)
    cfg = TrainConfig(
        steps=3, batch_size=4, eval_every=3, warmup_steps=0, lora=LoraSettings(r=2, alpha=2),
        objective=ObjectiveConfig(name="trap2"),
    )  # fmt: skip
    update = train_update(suite, "t", cfg).update
    assert update.kind == "lora" and set(update.deltas) <= set(base_state(suite.make_backbone()))


# --- splits ------------------------------------------------------------------------------------------


def test_carving_is_seeded_stratified_and_given_splits_are_used(bert_cls, tmp_path):
    rows = sentences(10)
    data = write_jsonl(tmp_path / "all.jsonl", rows)
    labels = [r["label"] for r in rows]
    a = carve(labels, [0.15, 0.15], 7, "x")
    b = carve(labels, [0.15, 0.15], 7, "x")
    c = carve(labels, [0.15, 0.15], 8, "x")
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert sorted(np.concatenate(a).tolist()) == list(range(30))  # a partition of the rows
    assert all(
        sorted(labels[i] for i in part) == sorted(labels[i] for i in a[1]) for part in a[1:]
    )  # stratified

    s1 = files_suite(bert_cls, [TaskFiles("t", data)], max_len=MAX_LEN, seed=7)
    s2 = files_suite(bert_cls, [TaskFiles("t", data)], max_len=MAX_LEN, seed=7)
    for split in ("train", "val", "test"):
        assert torch.equal(s1.task("t").split(split).x, s2.task("t").split(split).x)
    assert "carved" in s1.info["tasks"]["t"]["splits"]["val"]["from"]

    folder = tmp_path / "given"
    write_jsonl(folder / "train.jsonl", rows[:20])
    write_jsonl(folder / "validation.jsonl", rows[20:24])
    write_jsonl(folder / "test.jsonl", rows[24:])
    given = files_suite(bert_cls, [TaskFiles("t", folder)], max_len=MAX_LEN).task("t")
    assert (len(given.train), len(given.val), len(given.test)) == (20, 4, 6)
    names = sorted(WORDS)
    assert given.test.y.tolist() == [names.index(r["label"]) for r in rows[24:]]

    only_train_test = tmp_path / "tt"
    write_jsonl(only_train_test / "train.jsonl", rows[:24])
    write_jsonl(only_train_test / "test.jsonl", rows[24:])
    tt = files_suite(bert_cls, [TaskFiles("t", only_train_test)], max_len=MAX_LEN)
    assert len(tt.task("t").test) == 6 and len(tt.task("t").val) + len(tt.task("t").train) == 24
    assert tt.info["tasks"]["t"]["splits"]["test"]["from"].startswith("given")


def test_a_datasets_folder_gives_its_splits(bert_cls, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = sentences(8)
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:16]),
            "validation": datasets.Dataset.from_list(rows[16:20]),
            "test": datasets.Dataset.from_list(rows[20:]),
        }
    )
    ds.save_to_disk(str(tmp_path / "dd"))
    task = files_suite(bert_cls, [TaskFiles("t", tmp_path / "dd")], max_len=MAX_LEN).task("t")
    assert (len(task.train), len(task.val), len(task.test)) == (16, 4, 4)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))  # one Dataset: carved
    one = files_suite(bert_cls, [TaskFiles("t", tmp_path / "one")], max_len=MAX_LEN).task("t")
    assert len(one.train) + len(one.val) + len(one.test) == 24 and len(one.val) > 0


# --- vision ------------------------------------------------------------------------------------------


def test_vit_classifier_image_folder_and_its_own_labels(vit_cls, images, tmp_path):
    from transformers import ViTForImageClassification

    suite = files_suite(vit_cls, [TaskFiles("colours", images)])
    task = suite.task("colours")
    assert suite.info["kind"] == "image-head" and isinstance(task.head, Logits)
    assert suite.fingerprint == sha256(vit_cls / "model.safetensors")
    assert task.train.x.shape[1:] == (3, 16, 16) and task.train.x.dtype == torch.float32
    assert len(task.train) + len(task.val) + len(task.test) == 18
    # the class folders map through the model's own label2id (red 0, blue 1, green 2)
    rd = read_data(images)
    test_rows = carve([r["label"] for r in rd.train.rows], [0.15, 0.15], 0, "")[2]
    assert task.test.y.tolist() == [
        ("red", "blue", "green").index(rd.train.rows[i]["label"]) for i in test_rows
    ]
    assert suite.info["tasks"]["colours"]["classes"] == ["red", "blue", "green"]

    hf = ViTForImageClassification.from_pretrained(vit_cls).eval()
    torch.manual_seed(3)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=list(suite.lora_targets)))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    peft_model.save_pretrained(tmp_path / "ad")
    update = load_update(tmp_path / "ad")
    backbone = suite.make_backbone()
    w0 = base_state(backbone)
    assert len(update.deltas) == 12 and set(update.deltas) <= set(w0)  # 6 linear layers × 2 blocks
    with torch.no_grad():
        ours = functional_call(backbone, apply_delta(w0, update.dense()), (task.test.x,))
        theirs = peft_model.eval()(pixel_values=task.test.x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_vit_encoder_with_prototypes_from_split_image_folders(tmp_path):
    from transformers import ViTModel

    torch.manual_seed(4)
    ViTModel(vit_config()).save_pretrained(tmp_path / "vit")  # no processor config: resize + [-1, 1]
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        image_folder(tmp_path / "data" / split, n=n, seed=len(split))
    suite = files_suite(tmp_path / "vit", [TaskFiles("colours", tmp_path / "data")], batch_size=5)
    task = suite.task("colours")
    assert suite.info["kind"] == "image" and isinstance(task.head, CosineHead)
    assert (len(task.train), len(task.val), len(task.test)) == (12, 6, 6)
    assert float(task.train.x.min()) >= -1.0 and float(task.train.x.max()) <= 1.0
    hf = ViTModel.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        feats = F.normalize(hf(pixel_values=task.train.x).pooler_output, dim=-1)  # chunked by 5 in the suite
    protos = torch.stack([F.normalize(feats[task.train.y == c].mean(0), dim=-1) for c in range(3)])
    assert torch.allclose(task.head.prototypes, protos, atol=1e-5)
    assert [n for n, _ in suite.make_backbone().named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_clip_vision_model_from_a_datasets_image_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8,
    )  # fmt: skip
    torch.manual_seed(5)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clipv")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        img[..., i % 3] = 220
        rows.append({"image": Image.fromarray(img), "label": i % 3})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))}
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    suite = files_suite(tmp_path / "clipv", [TaskFiles("c", tmp_path / "ds")])
    task = suite.task("c")
    assert suite.info["kind"] == "image" and suite.info["tasks"]["c"]["classes"] == list(COLOURS)
    assert task.train.x.shape[1:] == (3, 16, 16) and len(task.train) + len(task.val) + len(task.test) == 18
    assert set(suite.lora_targets) >= {"q_proj", "v_proj"}
    hf = CLIPVisionModel.from_pretrained(tmp_path / "clipv")
    assert [n for n, _ in suite.make_backbone().named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_a_whole_clip_folder_uses_its_vision_tower_and_projection(tmp_path, images):
    from tiny_models import tiny_clip
    from transformers import CLIPModel

    folder = tiny_clip(tmp_path / "clip", image_size=16)
    suite = files_suite(folder, [TaskFiles("colours", images)])
    task = suite.task("colours")
    assert suite.info["kind"] == "image" and task.train.x.shape[1:] == (3, 16, 16)
    clip = CLIPModel.from_pretrained(folder).eval()
    backbone = suite.make_backbone()
    names = {n for n, _ in backbone.named_parameters()}
    assert names == {
        n for n, _ in clip.named_parameters() if n.startswith(("vision_model.", "visual_projection."))
    }
    with torch.no_grad():
        want = clip.visual_projection(clip.vision_model(pixel_values=task.val.x).pooler_output)
        assert torch.allclose(backbone(task.val.x), want, atol=1e-5)


# --- causal LMs go to Part B's suite -----------------------------------------------------------------


def test_a_causal_lm_is_handed_to_the_lm_files_suite(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path / "llama")
    calls = []
    fake = types.ModuleType("trap2.suites.files_lm")
    fake.lm_files_suite = lambda base, tasks, **kw: calls.append((base, tasks, kw)) or "lm-suite"
    monkeypatch.setitem(sys.modules, "trap2.suites.files_lm", fake)
    tasks = [TaskFiles("qa", tmp_path / "qa.jsonl")]
    assert files_suite(tmp_path / "llama", tasks, seed=4, batch_size=8) == "lm-suite"
    (base, got, kw) = calls[0]
    assert base == tmp_path / "llama" and got == tasks
    assert kw["scoring"] == "auto" and kw["seed"] == 4 and kw["batch_size"] == 8
    files_suite(tmp_path / "llama", tasks, scoring="exact")
    assert calls[1][2]["scoring"] == "exact"


# --- bad input ---------------------------------------------------------------------------------------


def _bad_cases(tmp_path, images):
    cases = {}
    cases["missing column"] = (
        write_jsonl(tmp_path / "nocol.jsonl", [*sentences(3), {"txt": "good film", "label": "pos"}]),
        r"nocol\.jsonl:10: missing column 'text'",
    )
    cases["missing label"] = (
        write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad"}] * 6),
        r"nolabel\.jsonl:2: missing column 'label'",
    )
    cases["label out of range"] = (
        write_jsonl(
            tmp_path / "range.jsonl",
            [{"text": "good", "label": i % 3} for i in range(20)] + [{"text": "bad", "label": 3}],
        ),
        r"range\.jsonl:21: label 3 is out of range for a model with 3 labels",
    )
    cases["mixed label kinds"] = (
        write_csv(
            tmp_path / "float.csv",
            [{"text": "good", "label": 1}, {"text": "bad", "label": "0.5"}],
            ["text", "label"],
        ),
        r"float\.csv:3: label '0\.5'",  # csv: a string that is not an int is a class name … mixed with ints
    )
    cases["json label not int or str"] = (
        write_jsonl(tmp_path / "obj.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": [0]}]),
        r"obj\.jsonl:2: label \[0\] is not an int or a string",
    )
    bad_img = image_folder(tmp_path / "badimg", n=4)
    (bad_img / "red" / "broken.png").write_bytes(b"not a png")
    cases["unreadable image"] = (bad_img, r"badimg/red/broken\.png: not a readable image")
    empty = tmp_path / "empty"
    write_jsonl(empty / "train.jsonl", sentences(3))
    (empty / "test.jsonl").write_text("\n")
    cases["empty split"] = (empty, r"empty/test\.jsonl: empty split")
    (tmp_path / "data.txt").write_text("good\t1\n")
    cases["unknown format"] = (tmp_path / "data.txt", r"data\.txt: unknown data format '\.txt'")
    cases["too few to carve"] = (
        write_jsonl(
            tmp_path / "two.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
        ),
        r"two\.jsonl: 2 rows are too few",
    )
    return cases


BAD = [
    "missing column",
    "missing label",
    "label out of range",
    "mixed label kinds",
    "json label not int or str",
    "unreadable image",
    "empty split",
    "unknown format",
    "too few to carve",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_one_line_error_naming_file_and_row(case, bert_cls, vit_cls, images, tmp_path):
    data, pattern = _bad_cases(tmp_path, images)[case]
    base = vit_cls if case == "unreadable image" else bert_cls
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=pattern) as err:
        files_suite(base, [TaskFiles("t", data)], max_len=MAX_LEN)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_bad_arguments(bert_cls, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentences(4))
    with pytest.raises(ConfigError, match="scoring 'loglik' is for causal LMs"):
        files_suite(bert_cls, [TaskFiles("t", data)], scoring="loglik")
    with pytest.raises(ConfigError, match="named twice"):
        files_suite(bert_cls, [TaskFiles("t", data), TaskFiles("t", data)])
    with pytest.raises(DataError, match="no config.json"):
        files_suite(tmp_path, [TaskFiles("t", data)])
