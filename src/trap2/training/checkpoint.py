"""Training checkpoints for ``--resume``: everything a step depends on, in safetensors + JSON.

Saved: the trainable parameters, the optimizer and scheduler state, the torch, data-order and scale
RNG states, and the loop's own position (step, epoch order, cursor, counters, history, best snapshot).
Nothing is pickled; the folder is replaced atomically, so a kill leaves the previous checkpoint.
Restoring it and running on gives the same update as a run that was never interrupted (bit-identical
on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trap2.errors import UpdateFileError
from trap2.io import atomic_dir, load_tensors, save_tensors

TENSORS = "state.safetensors"
SCALARS = "state.json"


def save_checkpoint(
    folder: Path,
    params: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    sched: Any,
    rngs: dict[str, torch.Tensor],
    loop: dict[str, Any],
    loop_tensors: dict[str, torch.Tensor],
) -> None:
    tensors = {f"param/{k}": v.detach() for k, v in params.items()}
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"opt/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors.update({f"rng/{k}": v for k, v in rngs.items()})
    tensors.update({f"loop/{k}": v for k, v in loop_tensors.items()})
    scalars = {
        "opt_param_groups": opt_state["param_groups"],
        "opt_state_keys": {str(i): sorted(st) for i, st in opt_state["state"].items()},
        "sched": sched.state_dict(),  # LambdaLR: lr_lambdas is [None] for plain functions (JSON-able)
        "loop": loop,
    }
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / TENSORS, tensors)
        (tmp / SCALARS).write_text(json.dumps(scalars))


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not (folder / TENSORS).is_file() or not (folder / SCALARS).is_file():
        raise UpdateFileError(f"{folder}: not a trap2 training checkpoint")
    tensors, _ = load_tensors(folder / TENSORS, check_finite=False)
    try:
        scalars = json.loads((folder / SCALARS).read_text())
    except json.JSONDecodeError:
        raise UpdateFileError(f"{folder / SCALARS}: not valid JSON") from None
    return tensors, scalars


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> None:
    state = {}
    for idx, keys in scalars["opt_state_keys"].items():
        state[int(idx)] = {k: tensors[f"opt/{idx}/{k}"] for k in keys}
    opt.load_state_dict({"state": state, "param_groups": scalars["opt_param_groups"]})


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
