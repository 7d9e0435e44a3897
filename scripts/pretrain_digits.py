"""Make the `digits` suite's pretrained backbone (W0) shipped in the package.

Run:  python scripts/pretrain_digits.py [--steps 3000] [--seed 0]
Writes src/trap2/suites/assets/digits_vit.safetensors (config and sha256 in the header metadata).
Deterministic on CPU for a given seed and torch version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from trap2.io import save_tensors
from trap2.suites.digits import pretrain_backbone

OUT = Path(__file__).resolve().parents[1] / "src" / "trap2" / "suites" / "assets" / "digits_vit.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, acc = pretrain_backbone(args.steps, args.seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    meta = {
        "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "sha256": digest.hexdigest(),
        "pretrain": json.dumps({"steps": args.steps, "seed": args.seed, "val_acc": round(acc, 4)}),
    }
    save_tensors(args.out, state, meta)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.out} ({n} parameters), pretraining val acc {acc:.3f}")


if __name__ == "__main__":
    main()
