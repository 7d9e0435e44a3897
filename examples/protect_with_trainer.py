"""Protect a fine-tuned update with transformers' Trainer: the one-line change.

A plain script says ``Trainer`` and ``TrainingArguments``; the protected one says ``Trap2Trainer`` and
``Trap2TrainingArguments`` and adds the ``trap2_*`` settings. Model, PEFT, data and optimiser are
unchanged. Here: a LoRA adapter for the digits suite's "rot90" task on its pretrained ViT (shipped
with trap2, offline), released as a PEFT folder that works alone and collapses at any other scale.

CPU, about a minute (2 threads):
    .venv/bin/python examples/protect_with_trainer.py --out runs/example
One GPU:
    .venv/bin/python examples/protect_with_trainer.py --out runs/example --device cuda
Several processes (DDP; the global batch stays --batch-size, split across processes):
    .venv/bin/accelerate launch --config_file configs/accelerate/ddp.yaml \
        examples/protect_with_trainer.py --out runs/example-ddp
    (on CPU: add --cpu after --config_file ..., and pass --device cpu)
The unprotected baseline: add --objective none. Full fine-tuning instead of LoRA: --mode full.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spin-waiting threads on a busy machine

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from trap2.eval.evaluate import scaling_curve  # noqa: E402
from trap2.hf import Trap2Trainer, Trap2TrainingArguments  # noqa: E402  (plain: Trainer, TrainingArguments)
from trap2.hf.models import task_examples, task_model  # noqa: E402
from trap2.suites import get_suite  # noqa: E402
from trap2.updates import load_update  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description="Train a Trap²-protected update with Trap2Trainer.")
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--objective", choices=["trap2", "none"], default="trap2")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--task", default="rot90")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes")
    ap.add_argument("--lam", type=float, default=0.1, help="λ: 0.1 for the digits heads (logit scale 100)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        raise SystemExit(f"--batch-size {a.batch_size} does not split over {world} processes")

    suite = get_suite("digits")
    task = suite.task(a.task)
    torch.manual_seed(a.seed)
    backbone = suite.make_backbone()
    if a.mode == "lora":
        backbone = get_peft_model(
            backbone, LoraConfig(r=8, lora_alpha=8, target_modules=list(suite.lora_targets))
        )
    else:
        backbone.requires_grad_(True)
    model = task_model(backbone, task)  # backbone + the task's frozen head, returns {"loss", "logits"}

    args = Trap2TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch_size // world,
        learning_rate=5e-3 if a.mode == "lora" else 1e-3,
        warmup_steps=50,
        lr_scheduler_type="cosine",
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=a.seed,
        use_cpu=a.device == "cpu",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        # --- the protection (the only lines a plain script does not have) ---
        trap2_objective=a.objective,
        trap2_lambda=a.lam,
        trap2_s_min=0.05,
        trap2_s_max=2.0,
        trap2_delta=0.05,
        trap2_weight="inv",
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=task_examples(task, "train"))
    trainer.train()

    if trainer.is_world_process_zero():
        folder = trainer.save_update(os.path.join(a.out, "update"), module=model.backbone)
        scales = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
        delta = load_update(folder).dense()  # ΔW as the merging tools see it
        curve = scaling_curve(suite.make_backbone(), task, delta, scales)
        print(f"{a.objective} {a.mode} update for {a.task} written to {folder}")
        print("scale s:       " + "  ".join(f"{s:5.2f}" for s in scales))
        print("test acc (%):  " + "  ".join(f"{100 * v:5.1f}" for v in curve))
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        tmp = os.path.join(a.out, ".result.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"scales": scales, "curve": curve, "losses": losses, "world_size": world}, f)
        os.replace(tmp, os.path.join(a.out, "result.json"))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit on every process (gloo aborts otherwise)


if __name__ == "__main__":
    main()
