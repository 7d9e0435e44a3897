"""A suite from a user's own model folder and data files: ``files_suite(base, [TaskFiles(...)])``.

What the base folder's config says decides the suite (``model_kind``):

| kind | config | backbone output | task head |
|---|---|---|---|
| ``text-head`` | ``*ForSequenceClassification`` | the model's logits | parameter-free identity |
| ``image-head`` | ``*ForImageClassification`` | the model's logits | parameter-free identity |
| ``text`` | any other text encoder (``AutoModel``) | masked mean of the last hidden states | prototypes |
| ``image`` | a vision config (ViT, CLIP vision, ConvNeXt, a whole CLIP) | image embedding | prototypes |
| ``lm`` | ``*ForCausalLM`` | delegated to ``trap2.suites.files_lm.lm_files_suite`` | |

Prototype heads are the frozen class means of W0 features on each task's training split (as the built-in
suites do). The backbone (:class:`HFBackbone`) holds the transformers model's own children, so its
``named_parameters()`` are the model's own names: an adapter trained with PEFT on the plain model
(``BertForSequenceClassification``, ``ViTModel``, …) loads with ``trap2.updates.load_update`` and applies
to the backbone without renaming. Text is tokenised with the folder's tokenizer into one int64 tensor
``(N, 2, L)`` of [ids; mask] (``(N, 3, L)`` with token type ids for ``text_a``/``text_b`` pairs);
images go through the folder's image processor (``preprocessor_config.json``), else a resize to
``config.image_size`` and a normalisation to [-1, 1].
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trap2.data.files import Labels, Records, complete_splits, label_ids, read_data, texts
from trap2.data.prepare import weights_fingerprint
from trap2.errors import ConfigError, DataError
from trap2.suites.base import Split, Suite, Task, prototype_head
from trap2.suites.make import make_suite
from trap2.suites.minilm import _quiet_transformers

log = logging.getLogger(__name__)

KINDS = ("text-head", "image-head", "text", "image", "lm")
SCORINGS = ("auto", "loglik", "exact")
LOGIT_SCALE = 50.0  # prototype heads' cosine logit scale (the text-transformer suite's)
FALLBACK_MEAN_STD = (0.5, 0.5)  # images without a processor config: pixels scaled to [-1, 1]


@dataclass(frozen=True)
class TaskFiles:
    name: str
    # a file (.jsonl/.csv) or a folder (ImageFolder tree, a datasets save_to_disk folder, or a folder with
    # train/val/test files)
    data: Path
    adapter: Path | None = None  # the task's released update (PEFT folder or trap2 delta); may be None


# --- the model ---------------------------------------------------------------------------------------


def load_config(base: Path) -> Any:
    from transformers import AutoConfig

    if not (base / "config.json").is_file():
        raise DataError(f"{base}: not a transformers model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{base}: config.json does not load ({str(e).splitlines()[0]})") from None


def model_kind(config: Any) -> str:
    """One of ``KINDS``, from the config's architectures and model type."""
    archs = tuple(getattr(config, "architectures", None) or ())
    if any(a.endswith("ForCausalLM") for a in archs):
        return "lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-head"
    if any(a.endswith("ForImageClassification") for a in archs):
        return "image-head"
    if config.model_type == "clip" or getattr(config, "num_channels", None) is not None:
        return "image"
    return "text"


def _load_model(base: Path, kind: str, config: Any) -> nn.Module:
    import transformers as tf

    loaders = {
        "text-head": tf.AutoModelForSequenceClassification,
        "image-head": tf.AutoModelForImageClassification,
        "text": tf.AutoModel,
        "image": tf.CLIPVisionModelWithProjection if config.model_type == "clip" else tf.AutoModel,
    }
    kwargs = {}
    if config.model_type == "clip":  # a whole CLIP: its vision tower and projection, at CLIP's width
        vision = copy.deepcopy(config.vision_config)
        vision.projection_dim = config.projection_dim
        kwargs["config"] = vision
    restore = _quiet_transformers()  # the load report (e.g. an unused pooler) is not news here
    try:
        model = loaders[kind].from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{base}: the model does not load as {kind} ({str(e).splitlines()[0]})") from None
    finally:
        restore()
    return model.eval()


class HFBackbone(nn.Module):
    """A transformers model as a suite backbone: one input tensor in, logits or features out.

    The model's children are this module's own children (the model itself is kept unregistered, as
    ``hf_model``), so ``named_parameters()`` are the model's own parameter names and ``functional_call``,
    PEFT and ``deepcopy`` act on the model's modules. Inputs run in chunks of ``batch_size``.
    """

    def __init__(self, model: nn.Module, modality: str, logits: bool, batch_size: int = 64) -> None:
        super().__init__()
        if any(True for _ in model.named_parameters(recurse=False)):
            raise ConfigError(f"{type(model).__name__} has parameters of its own outside its submodules")
        if hasattr(model, "hf_model"):
            raise ConfigError(
                f"{type(model).__name__} has a submodule named 'hf_model', which HFBackbone uses"
            )
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hf_model", model)  # not registered: its children are ours
        self.config = model.config
        self._modality = modality
        self._logits = logits
        self._chunk = int(batch_size)

    def train(self, mode: bool = True) -> HFBackbone:
        super().train(mode)
        self.hf_model.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self._chunk:
            return self._forward(x)
        return torch.cat([self._forward(c) for c in x.split(self._chunk)])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._modality == "image":
            out = self.hf_model(pixel_values=x)
            if self._logits:
                return out.logits
            for field in ("image_embeds", "pooler_output"):
                feats = getattr(out, field, None)
                if feats is not None:
                    return feats.flatten(1)
            return out.last_hidden_state.mean(1)
        if x.dim() != 3 or x.shape[1] not in (2, 3):
            raise ValueError(
                f"expected token ids, mask (and token types) stacked as (B, 2|3, L), got {tuple(x.shape)}"
            )
        n = max(1, int(x[:, 1].sum(1).max()))  # right padding: drop the columns no example uses
        x = x[:, :, :n]
        inputs = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
        if x.shape[1] == 3:
            inputs["token_type_ids"] = x[:, 2]
        out = self.hf_model(**inputs)
        if self._logits:
            return out.logits
        hidden = out.last_hidden_state  # (B, L, d): masked mean, the sentence embedding
        m = x[:, 1].unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Logits(nn.Module):
    """The head of a model with its own classifier: the backbone already returns the logits."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


# --- inputs ------------------------------------------------------------------------------------------


def _tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{base}: no loadable tokenizer ({str(e).splitlines()[0]})") from None
    tok.padding_side = "right"  # HFBackbone trims the padded tail
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def text_length(max_len: int, config: Any, tok: Any) -> int:
    """``max_len`` capped at the longest input the model takes (its position table, its tokenizer's
    limit), so a long text is truncated instead of overrunning the position embeddings."""
    limits = (
        max_len,
        getattr(config, "max_position_embeddings", None),
        getattr(tok, "model_max_length", None),
    )
    return min(int(v) for v in limits if isinstance(v, int) and v > 0)


def encode_text(tok: Any, records: Records, max_len: int) -> torch.Tensor:
    """Rows' texts → int64 (N, 2, max_len) [ids; mask], or (N, 3, max_len) with token types for pairs."""
    values = texts(records)
    pairs = isinstance(values[0], tuple)
    args = ([a for a, _ in values], [b for _, b in values]) if pairs else (values,)
    enc = tok(*args, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    parts = [enc["input_ids"], enc["attention_mask"]]
    if pairs and "token_type_ids" in enc:
        parts.append(enc["token_type_ids"])
    return torch.stack(parts, dim=1).to(torch.int64)


class ImageEncoder:
    """Images → float (N, 3, S, S) pixel values: the folder's image processor, else resize + [-1, 1]."""

    def __init__(self, base: Path, config: Any) -> None:
        self.processor = None
        if (base / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            try:
                self.processor = AutoImageProcessor.from_pretrained(base)
            except (OSError, ValueError, KeyError, ImportError) as e:
                raise DataError(
                    f"{base}/preprocessor_config.json: not a loadable image processor ({e})"
                ) from None
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", None)
        if self.processor is None and size is None:
            raise DataError(f"{base}: no preprocessor_config.json and no image_size in the config")
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size) if size is not None else 0

    def __call__(self, records: Records, chunk: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(records), chunk):
            images = [
                _open_image(r, w)
                for r, w in zip(records.rows[i : i + chunk], records.where[i : i + chunk], strict=True)
            ]
            out.append(self._pixels(images))
        return torch.cat(out)

    def _pixels(self, images: list[Any]) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images, return_tensors="pt")["pixel_values"].float()
        x = torch.stack(
            [torch.from_numpy(np.asarray(im.resize((self.size, self.size)), np.float32)) for im in images]
        )
        mean, std = FALLBACK_MEAN_STD
        return (x.permute(0, 3, 1, 2) / 255.0 - mean) / std  # (N, 3, S, S)


def _open_image(row: dict[str, Any], where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    value = row.get("image", row.get("img"))
    if value is None:
        raise DataError(f"{where}: missing column 'image'")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # datasets' undecoded Image
        import io

        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    try:
        with Image.open(value) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as e:
        raise DataError(f"{where}: not a readable image ({str(e).splitlines()[0]})") from None


# --- the suite ---------------------------------------------------------------------------------------


def files_suite(
    base: Path,
    tasks: Sequence[TaskFiles],
    *,
    name: str | None = None,
    scoring: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_len: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
) -> Suite:
    """A suite on the model in ``base`` with one task per ``TaskFiles`` (see the module docstring).

    Splits the data does not give are carved from it with ``seed``; ``batch_size`` bounds one forward
    of the backbone; ``device`` is where the prototype heads' W0 features are computed. A causal LM is
    handed to ``trap2.suites.files_lm.lm_files_suite`` (``scoring`` ``loglik`` or ``exact``).
    """
    base = Path(base)
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring {scoring!r} is unknown; valid: {', '.join(SCORINGS)}")
    _check_tasks(tasks)
    config = load_config(base)
    kind = model_kind(config)
    if kind == "lm":
        from trap2.suites.files_lm import lm_files_suite

        return lm_files_suite(
            base,
            tasks,
            name=name,
            scoring=scoring,  # "auto": loglik for 2–20 distinct answers, else exact (per task)
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            max_len=max_len,
            batch_size=batch_size,
            device=device,
        )
    if scoring != "auto":
        raise ConfigError(
            f"scoring {scoring!r} is for causal LMs; {base} is a {kind} model (scored by accuracy)"
        )
    modality, own_head = kind.split("-")[0], kind.endswith("-head")
    fingerprint = weights_fingerprint(base)
    template = HFBackbone(_load_model(base, kind, config), modality, own_head, batch_size)
    if modality == "text":
        tok = _tokenizer(base)
        max_len = text_length(max_len, config, tok)
        encode: Any = lambda records: encode_text(tok, records, max_len)  # noqa: E731
    else:
        encode = ImageEncoder(base, config)
    num_labels = int(config.num_labels) if own_head else None
    label2id = dict(getattr(config, "label2id", None) or {}) if own_head else None

    from trap2.training.loop import resolve_device

    device = str(resolve_device(device))
    feature_model = template.to(device) if device != "cpu" else template
    built: dict[str, Task] = {}
    info_tasks: dict[str, dict[str, Any]] = {}
    for t in tasks:
        built[t.name], info_tasks[t.name] = _build_task(
            t, encode, feature_model if not own_head else None, kind, num_labels, label2id,
            (seed, val_fraction, test_fraction), device,
        )  # fmt: skip
    template.to("cpu")
    full_frozen = _embedding_prefix(template) if modality == "text" else ()
    from trap2.hf.targets import default_lora_targets

    return make_suite(
        name=name or f"files-{base.name}",
        tasks=built,
        make_backbone=lambda: copy.deepcopy(template),
        backbone=template,
        lora_targets=tuple(default_lora_targets(template)),
        default_target=tasks[0].name,
        fingerprint=fingerprint,
        info={
            "backbone": f"{type(template.hf_model).__name__} ({base})",
            "kind": kind,
            "head": "the model's own classifier"
            if own_head
            else f"class-mean prototypes (scale {LOGIT_SCALE})",
            "max_len": max_len if modality == "text" else None,
            "seed": seed,
            "tasks": json.loads(json.dumps(info_tasks)),
        },
        full_frozen=full_frozen,
    )


def _build_task(
    t: TaskFiles,
    encode: Any,
    feature_model: nn.Module | None,
    kind: str,
    num_labels: int | None,
    label2id: dict[str, int] | None,
    carving: tuple[int, float, float],
    device: str,
) -> tuple[Task, dict[str, Any]]:
    """One task: its rows read and split, labels to ids, inputs encoded, and its head — the model's
    own (``feature_model`` None) or prototypes of ``feature_model``'s W0 features on train."""
    splits, origin = complete_splits(read_data(t.data), *carving)
    labels = label_ids(splits, num_labels, label2id)
    parts = {s: Split(encode(splits[s]), torch.from_numpy(labels.ids[s])) for s in splits}
    if feature_model is None:
        head: nn.Module = Logits()
    else:
        _check_classes(labels, splits["train"])
        train = _on(parts["train"], device)
        head = prototype_head(feature_model, train, labels.n_classes, LOGIT_SCALE).cpu()
    task = Task(
        t.name, labels.n_classes, parts["train"], parts["val"], parts["test"], head, f"{t.data} ({kind})"
    )
    info = {
        "data": str(t.data),
        "adapter": str(t.adapter) if t.adapter is not None else None,
        "splits": {s: {"n": len(parts[s]), "from": origin[s]} for s in parts},
        "classes": list(labels.classes) if labels.classes else None,
    }
    return task, info


def _check_tasks(tasks: Sequence[TaskFiles]) -> None:
    if not tasks:
        raise ConfigError("files_suite: no tasks given")
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"files_suite: task {dup!r} is named twice")
    for t in tasks:
        if not t.name or not t.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"files_suite: invalid task name {t.name!r}: use letters, digits, '_' or '-'")


def _check_classes(labels: Labels, train: Records) -> None:
    present = set(labels.ids["train"].tolist())
    for c in range(labels.n_classes):
        if c not in present:
            named = f" ({labels.classes[c]})" if labels.classes and c < len(labels.classes) else ""
            raise DataError(
                f"{train.source}: class {c}{named} has no training rows (a prototype head needs one)"
            )


def _on(split: Split, device: str) -> Split:
    return split if device == "cpu" else Split(split.x.to(device), split.y.to(device))


def _embedding_prefix(backbone: HFBackbone) -> tuple[str, ...]:
    """The input embedding table's parameter prefix: full fine-tuning keeps it at W0 (a large table)."""
    table = backbone.hf_model.get_input_embeddings()
    names = {id(m): n for n, m in backbone.named_modules()}
    return (f"{names[id(table)]}.",) if id(table) in names else ()
