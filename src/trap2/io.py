"""File I/O with two guarantees: nothing is unpickled, and nothing is left half-written.

Every writer goes through :func:`atomic_path`: the data lands in a temporary file beside the target and
is renamed over it only once complete, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trap2.errors import UpdateFileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_text(path, text)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UpdateFileError(f"{p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UpdateFileError(f"{p}: not valid JSON ({e})") from None


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically; metadata values must be strings (the format's rule)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(
    path: str | os.PathLike[str], *, check_finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file and its header metadata, with one-line errors.

    Refuses anything that is not safetensors (pickles included), and, by default, NaN/Inf values.
    """
    p = Path(path)
    if not p.is_file():
        raise UpdateFileError(f"{p}: no such file")
    if p.stat().st_size < 8:
        raise UpdateFileError(f"{p}: empty or truncated safetensors file")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UpdateFileError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if check_finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UpdateFileError(f"{p}: tensor {key!r} contains NaN or Inf")
    return tensors, metadata


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read (and checked) only when accessed.

    Lets a merge stream tensor by tensor: peak memory holds the tensors in use, not every input file.
    """

    def __init__(self, path: str | os.PathLike[str], check_finite: bool = True) -> None:
        self.path = Path(path)
        self.check_finite = check_finite
        _, self.metadata = _header(self.path)
        with safe_open(str(self.path), framework="pt") as f:
            self._keys = list(f.keys())  # noqa: SIM118

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise UpdateFileError(
                f"{self.path}: tensor {key!r} is unreadable ({str(e).splitlines()[0]})"
            ) from None
        if self.check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateFileError(f"{self.path}: tensor {key!r} contains NaN or Inf")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _header(p: Path) -> tuple[list[str], dict[str, str]]:
    if not p.is_file():
        raise UpdateFileError(f"{p}: no such file")
    if p.stat().st_size < 8:
        raise UpdateFileError(f"{p}: empty or truncated safetensors file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UpdateFileError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def open_tensors(
    path: str | os.PathLike[str], *, lazy: bool = False
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """Eager (:func:`load_tensors`) or lazy (:class:`LazyTensors`) access to a safetensors file."""
    if lazy:
        t = LazyTensors(path)
        return t, t.metadata
    return load_tensors(path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: report a non-finite number as null."""
    return x if math.isfinite(x) else None
