"""Helpers of the files-path tests: data files the tests write, and the CLI run in the test's own process
(so monkeypatched suites and fakes apply)."""

import csv
import json
import sys

from trap2 import cli


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, columns=None):
    """``rows`` under a header of ``columns`` (default: the first row's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def run_cli(monkeypatch, capsys, *args):
    """``trap2 ARGS`` through the CLI's own entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["trap2", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    got = capsys.readouterr()
    return code, got.out, got.err
