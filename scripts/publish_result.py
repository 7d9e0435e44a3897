"""Publish a run's result JSON under results/: trimmed of bulky fields, with its provenance.

Run:  python scripts/publish_result.py RUN/report.json results/NAME.json [--command "trap2 ..."]
          [--threads 2] [--wall-seconds 313] [--note "..."]
Keeps what ``trap2 report`` renders; drops search traces (``tried``) and per-step logs. A result written
by this version already carries ``kind``, ``command``, ``version``, ``threads``, ``machine`` and
``wall_seconds``; the options fill them in for one written before (they never overwrite a recorded value).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trap2.eval.report import provenance, read_result, result_kind
from trap2.io import write_json

BULKY = ("tried", "history", "log")


def trimmed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: trimmed(v) for k, v in value.items() if k not in BULKY}
    if isinstance(value, list):
        return [trimmed(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--command")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--wall-seconds", type=float)
    ap.add_argument("--machine")
    ap.add_argument("--note", help="how the result was made, where the command alone does not say")
    args = ap.parse_args()
    data = trimmed(read_result(args.source))
    kind = result_kind(data, str(args.source))
    given = {"command": args.command, "threads": args.threads, "wall_seconds": args.wall_seconds}
    given |= {"machine": args.machine, "note": args.note}
    recorded = {k: v for k, v in data.items() if v is not None}
    defaults = {**provenance(kind), **{k: v for k, v in given.items() if v is not None}}
    out = {**defaults, **recorded}
    out["kind"] = kind
    write_json(args.dest, out)
    print(f"wrote {args.dest} ({args.dest.stat().st_size} bytes, kind {kind})")


if __name__ == "__main__":
    main()
