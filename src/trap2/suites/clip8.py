"""Suite ``clip8``: the paper's vision setting from local paths — a CLIP model's vision tower fine-tuned
on the 8 datasets (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD), each task's head the frozen
zero-shot classifier from CLIP's text tower ("a photo of a {class}." averaged over templates), as in
task arithmetic and the Trap² paper.

Nothing is downloaded. Point the suite at local copies:

- ``$TRAP2_CLIP_MODEL``: a folder that ``transformers.CLIPModel.from_pretrained`` loads (with its
  tokenizer and image-processor config), e.g. a saved ``openai/clip-vit-base-patch32``.
- ``$TRAP2_CLIP8_DATA``: ``<dataset>/{train,test}/<class name>/<image>`` per dataset, the ImageFolder
  layout that torchvision reads (class folder names become the prompts; ``_`` reads as a space).

``trap2 data prepare clip8`` reads each dataset once, takes seeded subsets (validation carved from
train), resizes and centre-crops to the processor's crop size, and stores uint8 tensors in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trap2.data.prepare import (
    TaskSource,
    data_dir,
    env_path,
    load_prepared,
    prepare_task,
    weights_fingerprint,
)
from trap2.errors import DataError
from trap2.suites.base import CosineHead, Split, Suite, Task
from trap2.suites.make import make_suite

NAME = "clip8"
DATASETS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a close-up photo of a {}.")
SIZES = (2000, 500, 2000)  # train / val (from train) / test per dataset, capped by what the folder holds
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# the paper's LoRA recipe for CLIP ViT-B/32 (λ 1e-3, lr 1e-4, 2,000 steps at batch 128 on a GPU)
RECIPES: dict[str, dict[str, object]] = {
    "lora": {
        "steps": 2000,
        "batch_size": 128,
        "lr": 1e-4,
        "objective": {"lam": 1e-3},
        "checkpoint_every": 200,
    },
    "full": {
        "steps": 2000,
        "batch_size": 128,
        "lr": 1e-5,
        "objective": {"lam": 5e-3},
        "checkpoint_every": 200,
    },
}


def model_path() -> Path:
    return env_path(
        "TRAP2_CLIP_MODEL",
        "the clip8 suite reads CLIP from a local folder, a saved CLIPModel (e.g. CLIPModel.from_pretrained("
        "'openai/clip-vit-base-patch32').save_pretrained(DIR) where the hub is reachable)",
    )


def data_root() -> Path:
    return env_path("TRAP2_CLIP8_DATA", "the clip8 suite reads images from <dataset>/{train,test}/<class>/")


def image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ImageFolder layout: ``root/<class>/<image>`` → (paths, labels, class folder names), sorted."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected <class>/<image> inside)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(f) for f in files]
        labels += [i] * len(files)
    if not paths:
        raise DataError(f"{root}: no images in any class folder")
    return np.asarray(paths, dtype=object), np.asarray(labels, np.int64), classes


def dataset_source(name: str, root: Path) -> TaskSource:
    def load() -> dict:
        xtr, ytr, classes = image_folder(root / name / "train")
        xte, yte, test_classes = image_folder(root / name / "test")
        if test_classes != classes:
            raise DataError(f"{root / name}: train and test have different class folders")
        return {"train": (xtr, ytr), "test": (xte, yte), "classes": [c.replace("_", " ") for c in classes]}

    return TaskSource(name, load, *SIZES, f"{name} (ImageFolder at {root / name})")


def load_images(paths: np.ndarray, size: int) -> torch.Tensor:
    """Image files → uint8 (N, 3, size, size): shorter side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image, UnidentifiedImageError

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
                out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
    return out


def _processor(path: Path) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Crop size, mean and std from the model's ``preprocessor_config.json`` (read as JSON: the
    processor classes want torchvision, which this project does not depend on)."""
    cfg_path = path / "preprocessor_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        crop = cfg["crop_size"]
        size = int(crop["height"] if isinstance(crop, dict) else crop)
        mean = torch.tensor([float(v) for v in cfg["image_mean"]]).view(1, 3, 1, 1)
        std = torch.tensor([float(v) for v in cfg["image_std"]]).view(1, 3, 1, 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{cfg_path}: no usable CLIP image-processor config ({e})") from None
    return size, mean, std


def prepare(
    root: str | os.PathLike[str] | None = None,
    folder: Path | None = None,
    model: str | os.PathLike[str] | None = None,
    datasets: tuple[str, ...] | None = None,
) -> list[Path]:
    """Prepare ``datasets`` (default: those of the 8 found under ``root``)."""
    root = Path(root) if root is not None else data_root()
    size, _, _ = _processor(Path(model) if model is not None else model_path())
    if datasets is None:
        datasets = tuple(d for d in DATASETS if (root / d).is_dir())
        if not datasets:
            raise DataError(f"{root}: no such folder or none of {', '.join(DATASETS)} inside")
    return [
        prepare_task(NAME, dataset_source(d, root), size, folder, lambda p: load_images(p, size))
        for d in datasets
    ]


class CLIPImageEncoder(nn.Module):
    """CLIP's vision tower and projection: normalised pixels (B, 3, S, S) → image embeddings (B, d)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=x).pooler_output)


def _load_clip(path: Path):
    from transformers import CLIPModel

    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a saved CLIP model (no config.json)")
    try:
        return CLIPModel.from_pretrained(path).eval()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a loadable CLIPModel ({e})") from None


def load_image_encoder(path: str | os.PathLike[str] | None = None) -> CLIPImageEncoder:
    clip = _load_clip(Path(path) if path is not None else model_path())
    return CLIPImageEncoder(clip.vision_model, clip.visual_projection).eval()


@torch.no_grad()
def zero_shot_head(clip: nn.Module, tokenizer, classes: list[str]) -> CosineHead:
    """Each class's prototype: the mean of its normalised prompt embeddings (one per template)."""
    protos = []
    for c in classes:
        enc = tokenizer([t.format(c) for t in TEMPLATES], padding=True, return_tensors="pt")
        emb = F.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
        protos.append(emb.mean(0))
    return CosineHead(torch.stack(protos), float(clip.logit_scale.exp()))


def build_suite(folder: Path | None = None, model: str | os.PathLike[str] | None = None) -> Suite:
    from transformers import AutoTokenizer

    path = Path(model) if model is not None else model_path()
    clip = _load_clip(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    size, mean, std = _processor(path)
    tasks = {}
    base = folder or data_dir()
    names = [d for d in DATASETS if (base / NAME / f"{d}-{size}px.safetensors").is_file()] or list(DATASETS)
    for name in names:
        tensors, meta = load_prepared(NAME, name, size, folder)
        if "classes" not in meta:
            raise DataError(f"{NAME}/{name}: the prepared file has no class names; prepare it again")
        classes = json.loads(meta["classes"])
        splits = {
            s: Split((tensors[f"x_{s}"].float() / 255.0 - mean) / std, tensors[f"y_{s}"])
            for s in ("train", "val", "test")
        }
        head = zero_shot_head(clip, tokenizer, classes)
        tasks[name] = Task(
            name, len(classes), splits["train"], splits["val"], splits["test"], head, meta["source"]
        )
    return make_suite(
        name=NAME,
        tasks=tasks,
        make_backbone=lambda: load_image_encoder(path),
        lora_targets=LORA_TARGETS,
        default_target=names[0],
        fingerprint=weights_fingerprint(path),
        info={"backbone": f"CLIP vision tower ({path})", "image_size": size},
        recipes=RECIPES,
    )
