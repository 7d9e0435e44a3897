"""File I/O with two guarantees: nothing is unpickled, and nothing is left half-written.

Every writer goes through :func:`atomic_path`: the data lands in a temporary file beside the target and
is renamed over it only once complete, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
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


DIGESTS = "trap2.digests"  # header key: {tensor name: blake2b of its bytes}, checked on every load


def tensor_digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically, with a per-tensor digest in the header.

    safetensors has no checksum of its own: a flipped byte in the data would load as a wrong value.
    Metadata values must be strings (the format's rule).
    """
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta[DIGESTS] = json.dumps({k: tensor_digest(v) for k, v in flat.items()}, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys (same length, same offsets): safetensors writes its
    metadata map in no fixed order, so without this two saves of the same tensors differ in bytes."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        canonical = json.dumps(json.loads(header), separators=(",", ":"), sort_keys=True).encode()
        if len(canonical) <= n:
            f.seek(8)
            f.write(canonical.ljust(n, b" "))


def _verify(
    path: Path, key: str, t: torch.Tensor, digests: Mapping[str, str] | None, check_finite: bool
) -> None:
    if digests is not None and key in digests and tensor_digest(t) != digests[key]:
        raise UpdateFileError(
            f"{path}: tensor {key!r} does not match its recorded digest (the file is corrupted)"
        )
    if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UpdateFileError(f"{path}: tensor {key!r} contains NaN or Inf")


MARKERS = ("trap2", DIGESTS)  # header keys of files trap2 writes


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _digests(path: Path, metadata: Mapping[str, str]) -> dict[str, str] | None:
    # A damaged marker key must not pass the file off as one with nothing to check: a key one or two
    # edits away from a marker, or one marker without the other, means the header was altered.
    for key in metadata:
        if key not in MARKERS and any(_edit_distance(key, m) <= 2 for m in MARKERS):
            raise UpdateFileError(f"{path}: header key {key!r} is damaged (the file is corrupted)")
    if ("trap2" in metadata) and (DIGESTS not in metadata):
        raise UpdateFileError(f"{path}: the header lost its {DIGESTS!r} entry (the file is corrupted)")
    raw = metadata.get(DIGESTS)
    if raw is None:
        return None  # a file trap2 did not write: nothing to check against
    try:
        digests = json.loads(raw)
    except json.JSONDecodeError:
        raise UpdateFileError(f"{path}: the {DIGESTS!r} header entry is not valid JSON") from None
    if not isinstance(digests, dict):
        raise UpdateFileError(f"{path}: the {DIGESTS!r} header entry is not a mapping")
    return digests


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
    digests = _digests(p, metadata)
    for key, t in tensors.items():
        _verify(p, key, t, digests, check_finite)
    if digests is not None and set(digests) != set(tensors):
        raise UpdateFileError(f"{p}: the tensors do not match the recorded list (the file was altered)")
    return tensors, metadata


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read (and checked) only when accessed.

    Lets a merge stream tensor by tensor: peak memory holds the tensors in use, not every input file.
    """

    def __init__(self, path: str | os.PathLike[str], check_finite: bool = True) -> None:
        self.path = Path(path)
        self.check_finite = check_finite
        self._keys, self.metadata = _header(self.path)
        self._digests = _digests(self.path, self.metadata)
        if self._digests is not None and set(self._digests) != set(self._keys):
            raise UpdateFileError(
                f"{self.path}: the tensors do not match the recorded list (the file was altered)"
            )

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
        _verify(self.path, key, t, self._digests, self.check_finite)
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: report a non-finite number as null."""
    return x if math.isfinite(x) else None
