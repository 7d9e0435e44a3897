"""Pretrain the `lm` suite's backbone (a ~1.3 M-parameter LlamaForCausalLM, character-level) on the general
mixture of trap2.suites.lm_text, resumable in chunks, and ship it with its tokenizer.

Run (the shipped weights, in chunks of at most 9 minutes on 2 CPU cores):
    python scripts/pretrain_lm.py --steps 4000 --seed 0 --minutes 9             # first chunk
    python scripts/pretrain_lm.py --steps 4000 --seed 0 --minutes 9 --resume    # again until done
Each call trains from RUN/checkpoint.pt (default runs/pretrain-lm) for --minutes or --max-steps; the call
that reaches --steps writes the model folder (default src/trap2/suites/assets/lm: float16 safetensors,
config, tokenizer) and pretrain.json next to it (command, seed, steps, validation loss), and with
--result a copy with the provenance keys (results/lm-pretrain.json). The data of step k depend only on
(seed, k), so a chunked run equals an uninterrupted one. --check compares a finished run's validation loss
with the shipped pretrain.json instead of writing the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from trap2.errors import ConfigError
from trap2.eval.report import provenance
from trap2.io import write_json
from trap2.suites.lm import ASSET_DIR, save_backbone
from trap2.suites.lm_pretrain import PretrainConfig, resume, save_checkpoint, start, train, validation_loss
from trap2.suites.lm_text import Mixture, english_documents, make_tokenizer

log = logging.getLogger("pretrain_lm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps, help="total optimizer steps")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--english-share", type=float, default=defaults.english_share)
    ap.add_argument("--qa-share", type=float, default=defaults.qa_share)
    ap.add_argument("--minutes", type=float, default=None, help="training time of this call")
    ap.add_argument("--max-steps", type=int, default=None, help="steps of this call")
    ap.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    ap.add_argument("--run", type=Path, default=Path("runs/pretrain-lm"), help="checkpoint folder")
    ap.add_argument("--out", type=Path, default=ASSET_DIR, help="model folder written at the end")
    ap.add_argument("--result", type=Path, default=None, help="also write the record here (results/...)")
    ap.add_argument("--bigbench", type=Path, default=None, help="BIG-bench sdist (default: the data cache)")
    ap.add_argument("--check", action="store_true", help="compare with the shipped pretrain.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        steps=args.steps, seed=args.seed, english_share=args.english_share, qa_share=args.qa_share
    )
    tok = make_tokenizer()
    english = english_documents(args.bigbench) if cfg.english_share > 0 else []
    mixture = Mixture(tok, english, cfg.english_share, cfg.seed, qa_share=cfg.qa_share)
    ckpt = args.run / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = resume(cfg, tok, ckpt)
        log.info("resumed at step %d", state.step)
    elif ckpt.is_file() and not args.check:
        raise ConfigError(f"{ckpt} exists: pass --resume to continue it, or remove it to start over")
    else:
        state = start(cfg, tok)
    max_seconds = None if args.minutes is None else 60 * args.minutes
    t0 = time.perf_counter()
    train(state, cfg, mixture, args.max_steps, max_seconds, log=log.info)
    save_checkpoint(state, cfg, ckpt)
    if state.step < cfg.steps:
        log.info("stopped at step %d of %d: rerun with --resume", state.step, cfg.steps)
        return
    val = mixture.validation(cfg.n_val)
    record = {
        "command": shlex.join(
            [
                "python",
                "scripts/pretrain_lm.py",
                "--steps",
                str(cfg.steps),
                "--seed",
                str(cfg.seed),
                "--english-share",
                str(cfg.english_share),
                "--qa-share",
                str(cfg.qa_share),
            ]  # fmt: skip
        ),
        "config": asdict(cfg),
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "threads": args.threads,
        "english_documents": len(english),
        "val_sequences": cfg.n_val,
        "val_loss_fp32": round(validation_loss(state.model, val), 4),
        "torch": torch.__version__,
    }
    if args.check:
        shipped = json.loads((args.out / "pretrain.json").read_text())
        state.model.half().float()  # the shipped weights are float16
        record["val_loss"] = round(validation_loss(state.model, val), 4)
        log.info("this run: val loss %.4f; shipped: %.4f", record["val_loss"], shipped["val_loss"])
        if args.result:
            write_json(args.result, {**provenance("lm-pretrain", state.seconds), "check": record,
                                     "shipped": shipped})  # fmt: skip
        return
    record["val_loss"] = round(save_backbone(state.model, tok, args.out, val, record), 4)
    log.info(
        "wrote %s: val loss %.4f (%.0f s this call)", args.out, record["val_loss"], time.perf_counter() - t0
    )
    if args.result:
        write_json(args.result, {**provenance("lm-pretrain", state.seconds), **record})


if __name__ == "__main__":
    sys.exit(main())
