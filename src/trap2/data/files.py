"""A user's task data read from common file formats, as rows, with each row's place for error messages.

Formats (``read_data``):
- a ``.jsonl`` file (one JSON object per line) or a ``.csv`` file with a header row;
- an ImageFolder tree ``<class>/<image>`` (rows ``{"image": path, "label": class folder name}``);
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
- a folder of split files ``train.jsonl`` / ``validation.jsonl`` (or ``val``, ``valid``, ``dev``) /
  ``test.jsonl`` (or ``.csv``), or of ImageFolder trees ``train/`` ``val/`` ``test/``.

Splits the data does not give are carved from the training rows with a seed (``carve``: stratified by
label, the same every run). Labels (``label_ids``) are ints, strings of digits read as ints, or class
names mapped to ids in sorted order (or by the model's own ``label2id`` when it names every class).
Every error is one line naming the file and the row (``path:line`` for JSONL/CSV, the image's path,
``folder[split][index]`` for a ``datasets`` folder).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trap2.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# the file (or folder) stems each split is read from, in order of preference
SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}
SPLITS = tuple(SPLIT_STEMS)
FORMATS = (
    "a .jsonl or .csv file, an ImageFolder tree <class>/<image>, a datasets save_to_disk folder, "
    "or a folder of train/validation/test files"
)
_INT = re.compile(r"[-+]?\d+")


@dataclass(frozen=True)
class Records:
    """One split as read: a row per example (column → value) and where each row is, for errors."""

    source: Path  # the file or folder the rows come from
    rows: list[dict[str, Any]]
    where: list[str]  # per row: "file:line", an image's path, or "folder[split][index]"
    classes: tuple[str, ...] | None = None  # class names in id order, when the source defines them

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: Sequence[int]) -> Records:
        return replace(self, rows=[self.rows[i] for i in idx], where=[self.where[i] for i in idx])


@dataclass(frozen=True)
class DataSplits:
    """The splits a task's data gives: ``train`` always, ``val`` / ``test`` when the source has them."""

    source: Path
    train: Records
    val: Records | None = None
    test: Records | None = None

    @property
    def given(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if getattr(self, s) is not None)


# --- readers -------------------------------------------------------------------------------------


def jsonl_values(path: Path, text: str | None = None) -> Iterator[tuple[str, Any]]:
    """(``path:line``, parsed value) for each non-blank line of a JSONL file (or of ``text``, read from it
    already); a line that is not JSON is a one-line DataError naming it."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not readable as UTF-8 text ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e})") from None


def read_jsonl(path: Path) -> Records:
    """One JSON object per non-blank line; ``where`` is ``path:line``."""
    rows, where = [], []
    for at, row in jsonl_values(path):
        if not isinstance(row, dict):
            raise DataError(f'{at}: not a JSON object (want {{"column": value, ...}})')
        rows.append(row)
        where.append(at)
    return _non_empty(Records(path, rows, where))


def read_csv(path: Path) -> Records:
    """A CSV file with a header row; ``where`` is ``path:line`` (the header is line 1)."""
    rows, where = [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:  # more fields than the header names
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has columns")
                rows.append({k: v for k, v in row.items() if v is not None})
                where.append(f"{path}:{reader.line_num}")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    return _non_empty(Records(path, rows, where))


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(root: Path) -> Records:
    """ImageFolder ``root/<class>/<image>``: rows ``{"image": path, "label": class}`` in sorted order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [{"image": f, "label": c} for c in classes for f in _image_files(root / c)]
    if not rows:
        raise DataError(f"{root}: empty split (no images in any <class>/ folder)")
    return Records(root, rows, [str(r["image"]) for r in rows])


def read_saved_dataset(folder: Path) -> DataSplits:
    """A ``datasets`` folder from ``save_to_disk``: a ``DatasetDict``'s splits, or one ``Dataset``."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder}: a datasets save_to_disk folder needs the datasets package: "
            "pip install datasets  (or pip install 'trap2[files]')"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"{folder}: not a loadable datasets folder ({e})") from None
    if isinstance(loaded, datasets.Dataset):
        return DataSplits(folder, _dataset_records(folder, "train", loaded))
    found: dict[str, Records] = {}
    for split, stems in SPLIT_STEMS.items():
        name = next((s for s in stems if s in loaded), None)
        if name is not None:
            found[split] = _dataset_records(folder, name, loaded[name])
    if "train" not in found:
        raise DataError(f"{folder}: the DatasetDict has no 'train' split (it has {', '.join(loaded)})")
    return DataSplits(folder, **found)


def _dataset_records(folder: Path, split: str, ds: Any) -> Records:
    from datasets import ClassLabel

    label = ds.features.get("label")
    classes = tuple(label.names) if isinstance(label, ClassLabel) else None
    rows = [dict(r) for r in ds]
    where = [f"{folder}[{split}][{i}]" for i in range(len(rows))]
    records = Records(folder, rows, where, classes)
    if not rows:
        raise DataError(f"{folder}[{split}]: empty split (no rows)")
    return records


def _non_empty(records: Records) -> Records:
    if not len(records):
        raise DataError(f"{records.source}: empty split (no rows)")
    return records


def _read_file(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r} (want {FORMATS})")


def _is_image_tree(folder: Path) -> bool:
    return any(p.is_dir() and _image_files(p) for p in folder.iterdir())


def read_data(path: str | Path) -> DataSplits:
    """Whatever ``path`` holds, as its splits (see the module docstring for the formats)."""
    path = Path(path)
    if path.is_file():
        return DataSplits(path, _read_file(path))
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return read_saved_dataset(path)
    files = {}
    for split, stems in SPLIT_STEMS.items():
        for stem in stems:
            found = [path / f"{stem}{s}" for s in TABLE_SUFFIXES if (path / f"{stem}{s}").is_file()]
            if found:
                files[split] = found[0]
                break
    if files:
        if "train" not in files:
            raise DataError(f"{path}: split files but no train.jsonl / train.csv")
        return DataSplits(path, **{s: _read_file(f) for s, f in files.items()})
    subdirs = {p.name for p in path.iterdir() if p.is_dir()}
    split_dirs = {
        split: next((path / s for s in stems if s in subdirs), None) for split, stems in SPLIT_STEMS.items()
    }
    all_splits = {s for stems in SPLIT_STEMS.values() for s in stems}
    if split_dirs["train"] is not None and subdirs <= all_splits:
        return DataSplits(path, **{s: read_image_folder(d) for s, d in split_dirs.items() if d is not None})
    if subdirs and _is_image_tree(path):
        return DataSplits(path, read_image_folder(path))
    raise DataError(f"{path}: unknown data format (want {FORMATS})")


# --- columns and labels ---------------------------------------------------------------------------


def texts(records: Records) -> list[str] | list[tuple[str, str]]:
    """The ``text`` column, or ``(text_a, text_b)`` pairs (``text_a`` alone reads as single texts); the
    first row decides which."""
    first = records.rows[0]
    cols = ("text",) if "text" in first else ("text_a", "text_b") if "text_b" in first else ("text_a",)
    out = []
    for row, where in zip(records.rows, records.where, strict=True):
        values = []
        for c in cols:
            if c not in row:
                wanted = (
                    "'text' (or 'text_a'/'text_b')" if c in ("text", "text_a") and c not in first else repr(c)
                )
                raise DataError(f"{where}: missing column {wanted}")
            if not isinstance(row[c], str):
                raise DataError(f"{where}: column {c!r} is {type(row[c]).__name__}, not a string")
            values.append(row[c])
        out.append(values[0] if len(values) == 1 else (values[0], values[1]))
    return out


def raw_labels(records: Records, column: str = "label") -> list[int | str]:
    """Each row's label: an int (a string of digits reads as one) or a class name; one kind per split."""
    out: list[int | str] = []
    for row, where in zip(records.rows, records.where, strict=True):
        if column not in row:
            raise DataError(f"{where}: missing column {column!r}")
        v = row[column]
        if isinstance(v, str) and _INT.fullmatch(v.strip()):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DataError(f"{where}: label {v!r} is not an int or a string")
        if out and isinstance(v, int) != isinstance(out[0], int):
            kinds = "integers" if isinstance(out[0], int) else "class names"
            raise DataError(f"{where}: label {v!r} does not match the earlier labels ({kinds})")
        out.append(v)
    return out


@dataclass(frozen=True)
class Labels:
    """Label ids per split, the class count and the class names when known."""

    ids: dict[str, np.ndarray]  # split -> int64 (N,)
    n_classes: int
    classes: tuple[str, ...] | None = None


def label_ids(
    splits: Mapping[str, Records],
    num_labels: int | None = None,
    label2id: Mapping[str, int] | None = None,
) -> Labels:
    """Ids for every split's labels. ``num_labels``: the model's own head size (ids must be below it);
    ``label2id``: the model's own class names, used when they name every string label."""
    raw = {s: raw_labels(r) for s, r in splits.items()}
    first = next(iter(splits.values()))
    kinds = {s: isinstance(v[0], int) for s, v in raw.items()}
    if len(set(kinds.values())) > 1:
        s = next(s for s, k in kinds.items() if k != kinds["train"])
        raise DataError(
            f"{splits[s].where[0]}: labels are {'ints' if kinds[s] else 'class names'} "
            f"but the train split's are not"
        )
    classes = first.classes
    if kinds["train"]:
        mapping = None
    else:
        names = sorted({v for vals in raw.values() for v in vals})
        if label2id and all(n in label2id for n in names):
            mapping = {n: int(label2id[n]) for n in names}
            by_id = {i: n for n, i in label2id.items()}
            classes = tuple(by_id.get(i, str(i)) for i in range(max(by_id) + 1))
        else:
            mapping = {n: i for i, n in enumerate(names)}
            classes = tuple(names)
    ids: dict[str, np.ndarray] = {}
    for s, vals in raw.items():
        out = np.asarray([mapping[v] for v in vals] if mapping else vals, dtype=np.int64)
        for i, (v, y) in enumerate(zip(vals, out, strict=True)):
            if y < 0:
                raise DataError(f"{splits[s].where[i]}: label {v!r} is negative")
            if num_labels is not None and y >= num_labels:
                raise DataError(
                    f"{splits[s].where[i]}: label {v!r} is out of range for a model with {num_labels} labels "
                    f"(ids 0..{num_labels - 1})"
                )
        ids[s] = out
    n_classes = num_labels or max(
        int(max(int(v.max()) for v in ids.values())) + 1, len(classes) if classes else 0
    )
    return Labels(ids, n_classes, classes)


# --- splits ----------------------------------------------------------------------------------------


def carve(labels: Sequence[Any], fractions: Sequence[float], seed: int, where: str) -> list[np.ndarray]:
    """Stratified split of ``len(labels)`` rows into ``1 + len(fractions)`` parts: part k+1 takes
    round(fraction_k · n_c) of each class (at least one row each over the whole), part 0 the rest;
    each part's indices in the rows' own order. The same for the same labels and seed."""
    labels = list(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y in sorted(by_class, key=lambda v: (isinstance(v, str), v)):
        idx = np.asarray(by_class[y])[rng.permutation(len(by_class[y]))]
        start = 0
        for k, frac in enumerate(fractions, 1):
            n = min(int(round(frac * len(idx))), len(idx) - start - 1)  # keep one row for part 0
            parts[k] += idx[start : start + max(n, 0)].tolist()
            start += max(n, 0)
        parts[0] += idx[start:].tolist()
    for k, frac in enumerate(fractions, 1):  # small classes gave none: one row of the largest class
        if frac > 0 and not parts[k]:
            left = Counter(labels[i] for i in parts[0])
            y, count = max(left.items(), key=lambda kv: kv[1], default=(None, 0))
            if count < 2:
                raise DataError(f"{where}: {len(labels)} rows are too few to carve validation and test rows")
            row = next(i for i in parts[0] if labels[i] == y)
            parts[0].remove(row)
            parts[k].append(row)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def complete_splits(
    data: DataSplits, seed: int, val_fraction: float, test_fraction: float, label: str | None = "label"
) -> tuple[dict[str, Records], dict[str, str]]:
    """Train, val and test rows: the given splits, and the missing ones carved from train (``carve``,
    stratified by the ``label`` column, checked first; ``None``: not stratified). Returns the splits and
    where each came from."""
    missing = [s for s in ("val", "test") if getattr(data, s) is None]
    fractions = {"val": val_fraction, "test": test_fraction}
    for s in missing:
        if not 0.0 < fractions[s] < 1.0:
            raise DataError(
                f"{data.source}: no {s} split given and {s}_fraction {fractions[s]} is not in (0, 1)"
            )
    out = {s: getattr(data, s) for s in SPLITS if getattr(data, s) is not None}
    origin = {s: f"given ({out[s].source})" for s in out}
    if missing:
        train = data.train
        strata = raw_labels(train, label) if label is not None else [0] * len(train)
        parts = carve(strata, [fractions[s] for s in missing], seed, str(train.source))
        out["train"] = train.take(parts[0])
        for s, idx in zip(missing, parts[1:], strict=True):
            out[s] = train.take(idx)
            origin[s] = f"carved from train (seed {seed}, fraction {fractions[s]})"
    for s, r in out.items():
        if not len(r):
            raise DataError(f"{r.source}: empty {s} split (no rows)")
    return {s: out[s] for s in SPLITS}, origin
