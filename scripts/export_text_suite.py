"""Write the built-in text-transformer suite as a user's files: the tasks' exact train / val / test
texts as JSONL and its updates as adapters of the plain MiniLM, so ``trap2 audit --base`` can be checked
against ``trap2 audit --suite text-transformer`` on the same data and the same updates.

    .venv/bin/python scripts/export_text_suite.py --out runs/text4/files \\
        --tasks sentiment,question_type,hyperbaton,fever \\
        --update hyperbaton=runs/text4/hyperbaton-trap2 --update sentiment=runs/text4/builtin/updates/...

Each task becomes ``OUT/data/<task>/{train,val,test}.jsonl`` with ``text`` and ``label`` rows: the same
rows, in the same order, that ``trap2 data prepare text-transformer`` encodes (BIG-bench read from the
sdist, the same cleaning and the same seeded split). Each update becomes ``OUT/adapters/<task>``: the
suite's backbone wraps the encoder as ``bert.``, a plain transformers ``BertModel`` (what ``--base``
loads) has no such prefix, so the keys lose it. The script prints the ``trap2 audit --base`` command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trap2.data.prepare import SPLIT_SEED, bigbench_source, split_indices
from trap2.errors import ConfigError
from trap2.io import atomic_path
from trap2.suites import text_transformer
from trap2.suites.minilm import model_path
from trap2.updates import Update, load_update

PREFIX = "bert."  # the suite's SentenceEncoder holds the transformers model as ``bert``


def export_tasks(out: Path, tasks: list[str], bigbench: Path | None = None) -> dict[str, Path]:
    """``{task: folder}`` of JSONL splits, the rows prepare_task encodes (same split indices)."""
    sources = {t.name: t for t in text_transformer.task_sources(bigbench or bigbench_source())}
    unknown = [t for t in tasks if t not in sources]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; valid: {', '.join(sources)}")
    folders = {}
    for name in tasks:
        src = sources[name]
        texts, labels = src.load()
        idx = split_indices(len(labels), (src.n_train, src.n_val, src.n_test), SPLIT_SEED)
        folder = out / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in zip(("train", "val", "test"), idx, strict=True):
            lines = [json.dumps({"text": str(texts[i]), "label": int(labels[i])}) for i in rows]
            with atomic_path(folder / f"{split}.jsonl") as tmp:
                Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
        folders[name] = folder
    return folders


def export_update(src: Path, dst: Path) -> Path:
    """The update at ``src`` with the suite's ``bert.`` prefix removed from every key."""
    update = load_update(src)
    bad = [k for k in update.deltas if not k.startswith(PREFIX)]
    if bad:
        raise ConfigError(f"{src}: {bad[0]!r} is not a text-transformer backbone key ({PREFIX}…)")
    renamed = {k[len(PREFIX) :]: d for k, d in update.deltas.items()}
    return Update(renamed, {**update.meta, "exported_from": str(src)}).save(dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default=",".join(text_transformer.TASKS))
    ap.add_argument("--update", action="append", default=[], metavar="TASK=FOLDER")
    ap.add_argument("--bigbench", type=Path, default=None, help="the BIG-bench sdist (default: the cache)")
    a = ap.parse_args()
    tasks = [t for t in a.tasks.split(",") if t]
    data = export_tasks(a.out, tasks, a.bigbench)
    adapters = {}
    for item in a.update:
        task, sep, folder = item.partition("=")
        if not sep or task not in data:
            raise ConfigError(f"--update {item!r}: expected TASK=FOLDER with TASK one of {', '.join(data)}")
        adapters[task] = export_update(Path(folder), a.out / "adapters" / task)
    specs = " ".join(f"--task {t}={adapters.get(t, '')}:{data[t]}" for t in tasks)
    print(f"trap2 audit --base {model_path()} {specs} --max-len {text_transformer.MAX_LEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
