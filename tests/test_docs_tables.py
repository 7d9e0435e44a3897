"""Every table marked ``<!-- trap2-report results/NAME.json [TABLE] -->`` in README.md and docs/*.md is
``trap2 report``'s rendering of that JSON: re-rendered here, a difference fails with its diff
(``trap2 report --update-docs`` rewrites the blocks)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from trap2.eval.report import MARKER, doc_files, read_result, render_doc

ROOT = Path(__file__).resolve().parents[1]
DOCS = doc_files(ROOT)


def test_the_readme_has_marked_tables():
    assert MARKER.search((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_marked_tables_match_their_json(doc):
    text = doc.read_text(encoding="utf-8")
    new = render_doc(text, ROOT, where=str(doc))
    diff = "".join(
        difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(doc), "re-rendered from JSON")
    )
    assert new == text, f"stale tables (run `trap2 report --update-docs`):\n{diff}"


def test_every_published_result_records_how_it_was_made():
    for path in sorted((ROOT / "results").glob("*.json")):
        data = read_result(path)
        for key in ("kind", "command", "version", "threads", "machine", "wall_seconds"):
            assert data.get(key) not in (None, ""), (path.name, key)
