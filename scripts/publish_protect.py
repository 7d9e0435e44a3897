"""Publish a ``trap2 protect`` measurement as results/protect-SUITE.json (rendered by ``trap2 report``'s
``protect`` renderer into docs/protect.md).

Run:  python scripts/publish_protect.py --original ORIGINAL --protected OUT --audit AUDIT/report.json \\
          --cost cost.json --command "trap2 protect ..." --command "trap2 audit ..." \\
          --command "python benchmarks/protect_cost.py ..." --protect-seconds 9.8 --threads 2 \\
          --dest results/protect-digits.json

Joins the protected release's metadata (the protect settings and the agreement it measured), the audit of
it (standalone, scaling curve, merge cells against zero-shot) and the cost benchmark's ratios, with the
commands that made each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from trap2 import __version__
from trap2.io import write_json
from trap2.updates import load_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, help="the update that was protected")
    ap.add_argument("--protected", required=True, type=Path, help="trap2 protect's --out folder")
    ap.add_argument(
        "--audit", required=True, type=Path, help="trap2 audit's report.json for the protected one"
    )
    ap.add_argument("--cost", required=True, type=Path, help="benchmarks/protect_cost.py --out JSON")
    ap.add_argument("--command", action="append", required=True, help="each command run, in order")
    ap.add_argument("--protect-seconds", type=float, required=True, help="wall time of trap2 protect")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()}), shared")
    ap.add_argument("--dest", required=True, type=Path)
    args = ap.parse_args()

    original = load_update(args.original)
    protected = load_update(args.protected)
    audit = json.loads(args.audit.read_text())
    cost = json.loads(args.cost.read_text())
    meta = {k: v for k, v in protected.meta.items() if k != "teacher"}
    result = {
        "kind": "protect",
        "command": args.command,
        "version": __version__,
        "threads": args.threads,
        "machine": args.machine,
        "wall_seconds": {
            "protect": args.protect_seconds,
            "audit": audit["wall_seconds"],
            "cost_benchmark": cost["wall_seconds"],
        },
        "suite": audit["suite"],
        "target": audit["target"],
        "original": {
            "path": str(args.original),
            "fingerprint": protected.meta["teacher"]["fingerprint"],
            "train": original.meta.get("train"),
        },
        "protected_meta": meta,
        "agreement_test": protected.meta["protect"]["agreement_test"],
        "zero_shot": audit["zero_shot"],
        "standalone": audit["standalone"],
        "scaling_curve": audit["scaling_curve"],
        "attacks": audit["attacks"],
        "cost": {k: cost[k] for k in ("steps", "step_seconds", "teacher_pass_seconds", "teacher_inputs",
                                      "compute_seconds", "ratios")},
        "audit_config": audit["config"],
    }  # fmt: skip
    write_json(args.dest, result)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
