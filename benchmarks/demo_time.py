"""Time ``trap2 demo`` as a newcomer runs it: the README's command in a clean temporary folder (no cached
updates), its wall time from process start to exit, and each stage's share.

Run (inside the compute lock on a shared machine):
    python benchmarks/demo_time.py [--threads 2] [--keep DIR] [--json OUT.json]
Prints the wall time, the machine and a table of the stages (the demo records each stage's seconds in
its report.json, ``stages``); ``--keep DIR`` keeps the run's folder (its report.json is what
``scripts/publish_result.py`` publishes as results/digits-demo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trap2.eval.report import machine, provenance
from trap2.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="copy the demo's output folder here")
    ap.add_argument("--json", type=Path, help="also write the timing as JSON here")
    ap.add_argument("extra", nargs="*", help="more `trap2 demo` arguments (after --)")
    args = ap.parse_args()
    trap2 = shutil.which("trap2") or str(Path(sys.executable).with_name("trap2"))
    with tempfile.TemporaryDirectory(prefix="trap2-demo-time-") as tmp:
        cmd = [trap2, "demo", "--out", "runs/demo", "--threads", str(args.threads), *args.extra]
        env = {**os.environ, "TRAP2_DATA": str(Path(tmp) / "cache")}  # nothing prepared: a fresh user
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            sys.exit(f"trap2 demo failed ({run.returncode}):\n{run.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "runs" / "demo" / "report.json").read_text())
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(Path(tmp) / "runs" / "demo", args.keep)
    stages = report.get("stages", [])
    staged = sum(s["seconds"] for s in stages)
    rows = [*stages, {"stage": "start-up, data, standalone and curves, report", "seconds": wall - staged}]
    print(f"trap2 demo --threads {args.threads}: {wall:.0f} s wall on {machine()}")
    print(f"{'stage':72} {'s':>6} {'share':>6}")
    for s in rows:
        print(f"{s['stage'][:72]:72} {s['seconds']:6.1f} {100 * s['seconds'] / wall:5.0f} %")
    if args.json:
        result = {**provenance("demo-time", wall), "threads": args.threads}
        result["command"] = shlex.join(["python", "benchmarks/demo_time.py", *sys.argv[1:]])
        result["demo_command"] = shlex.join(["trap2", *cmd[1:]])
        write_json(
            args.json,
            {**result, "stages": rows, "pool": report.get("pool"), "workers": report.get("workers")},
        )


if __name__ == "__main__":
    main()
