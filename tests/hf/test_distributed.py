"""Two CPU processes (gloo): DDP through Trap2Trainer matches one process with the same global batch,
and the per-layer scaling is right on an FSDP-sharded model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "protect_with_trainer.py"


def run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        *args,
    ]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    steps = ["--steps", "300", "--batch-size", "64", "--threads", "1"]
    run(torchrun(str(EXAMPLE), "--out", str(tmp_path / "ddp"), *steps))
    run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "one"), *steps])
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp["losses"]) == len(one["losses"]) == 30
    # the same global batch, the same s per step: the same objective values, step after step (the
    # first 50; later, all-reduce rounding grows through the trap term's large gradients)
    first = slice(0, 5)
    torch.testing.assert_close(
        torch.tensor(ddp["losses"][first]), torch.tensor(one["losses"][first]), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(torch.tensor(ddp["curve"]), torch.tensor(one["curve"]), rtol=0, atol=0.03)
    curve = dict(zip(ddp["scales"], ddp["curve"], strict=True))
    assert curve[1.0] >= 0.85  # the protected update works at its nominal scale ...
    assert max(curve[0.5], curve[2.0]) <= 0.3  # ... and collapses off it


def test_fsdp_per_layer_scaling():
    out = run(torchrun(str(ROOT / "tests" / "hf" / "fsdp_worker.py")))
    assert out.count("FSDP scaled forward and gradients OK") == 2
