"""Sweep of ``trap2 protect`` settings (issue 23): one process, one JSON row per setting.

Run:  python benchmarks/protect_sweep.py [--suite S --target T] [--original UPDATE] [--plain-steps N] \
          OUT.json SPEC [SPEC ...]   (THREADS=2 by default)

Each SPEC protects the original (default: the digits demo's plain rot90 LoRA; on another suite
``--original`` is required) with ``prepare_protect`` and the loop's steps, then measures top-1 agreement
with the original and standalone accuracy on test, the scaling curve acc(s), and the training wall time
over the original's N plain steps (default 600, at the suite's LoRA batch size) timed in the same process
(a compute estimate; ``benchmarks/protect_cost.py`` is the measurement of record). SPEC: comma-separated k=v: steps, lam, lr,
T (temperature), bound, delta, law, weight, coll (collateral μ), s_min, s_max, seed, bs (batch), warm,
eps and b2 (AdamW's ε and β2: a large ε stops Adam from blowing float-noise gradients up to full steps),
reps and rlr (ε, and a multiplier of the lr, from the cut on: the repair phase's),
cut (the off-nominal term in the first cut·steps only: ``ProtectConfig.repair`` = 1 − cut), frac
(``off_fraction``), every (``off_every``), and variants that are not package knobs, tried and not adopted:
aug (K mixed-up copies of the inputs beside them, for the teacher to label), sched (ramp | decay | late: λ over the run), rank (extra LoRA rank, new B = 0), margin / m (a hinge on the
teacher class's logit margin at s = 1), off=hinge / moff (a hinge instead of CE off scale).
The trap step here is written out (no dropout replay: the digits and vision-cnn LoRA have none); the package's is
``Trap2Objective.backward`` through ``SelfDistillObjective``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trap2 import __version__
from trap2.bench import BenchConfig
from trap2.config import ObjectiveConfig, TrainConfig
from trap2.eval.evaluate import scaling_curve
from trap2.io import write_json
from trap2.objectives.base import StepStats
from trap2.objectives.self_distill import SelfDistillObjective
from trap2.objectives.trap2 import bounded, disruption, feature_tap, sample_scales, scale_weight
from trap2.pipeline import DemoConfig, update_cache_folder
from trap2.protect import ProtectConfig, _agreement, prepare_protect
from trap2.suites import get_suite
from trap2.training.loop import _release, _setup, _step
from trap2.updates import LowRank, Update, load_update

DEMO_CACHE = Path("runs/demo/updates")  # the demo's cached plain rot90 LoRA is the default original
CURVE_S = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0]


def pad_rank(update: Update, extra: int, seed: int = 0) -> Update:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for k, d in update.deltas.items():
        a_new = torch.randn(extra, d.A.shape[1], generator=g) / math.sqrt(d.A.shape[1])
        deltas[k] = LowRank(
            torch.cat([d.A, a_new.to(d.A.dtype)]),
            torch.cat([d.B, torch.zeros(d.B.shape[0], extra, dtype=d.B.dtype)], 1),
            d.scaling,
            d.fan_in_fan_out,
        )
    return Update(deltas, dict(update.meta), None)


def mixup_inputs(x: torch.Tensor, copies: int, seed: int = 0) -> torch.Tensor:
    """The inputs and ``copies`` mixed copies: each x_i mixed with a random x_j, weight m ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = [x]
    for _ in range(copies):
        j = torch.randperm(len(x), generator=g)
        m = torch.rand(len(x), *([1] * (x.dim() - 1)), generator=g)
        out.append(m * x + (1 - m) * x[j])
    return torch.cat(out)


def margin_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f_target − max_{j≠target} f_j per sample."""
    f_t = out.gather(1, target[:, None])[:, 0]
    other = out.scatter(1, target[:, None], float("-inf")).amax(1)
    return f_t - other


class Exp(SelfDistillObjective):
    def __init__(self, cfg, T, spec, total):
        super().__init__(cfg, "kl", T)
        self.spec, self.total, self.t = spec, total, 0

    def lam_at(self, t):
        lam, kind, total = self.cfg.lam, self.spec.get("sched", "const"), self.total
        if "cut" in self.spec:  # λ for the first cut·steps, then the teacher match alone (repair)
            return lam if t <= self.spec["cut"] * total else 0.0
        if kind == "ramp":  # 0 -> λ over the first third
            return lam * min(1.0, t / (total / 3))
        if kind == "decay":  # λ -> 0 linearly
            return lam * (1 - (t - 1) / total)
        if kind == "late":  # λ for the first 2/3, then 0 (repair phase, nominal only)
            return lam if t <= 2 * total / 3 else 0.0
        if kind == "late80":
            return lam if t <= 0.8 * total else 0.0
        return lam

    def backward(self, model, x, y, loss_fn, gen):
        sp, cfg = self.spec, self.cfg
        self.t += 1
        out1 = model(x, 1.0)
        nominal = self.nominal_term(out1, y, loss_fn)
        if sp.get("margin"):
            m = margin_of(out1.float(), y.argmax(-1))
            nominal = nominal + sp["margin"] * F.relu(sp.get("m", 5.0) - m).mean()
        nominal.backward()
        j = float(nominal.detach())
        lam = self.lam_at(self.t)
        every = int(sp.get("every", 1))
        if lam == 0 or self.t % every:
            return StepStats(loss=j, nominal=j)
        n = max(1, round(len(x) * sp.get("frac", 1.0)))
        xo, yo = x[:n], y[:n]
        scales = sample_scales(cfg, cfg.n_samples, gen)
        if cfg.collateral:
            with torch.no_grad(), feature_tap(model) as seen:
                model(xo, 0.0)
            base = seen[-1].detach()
        offs = []
        for s in scales:
            with feature_tap(model) as seen:
                out = model(xo, s)
            if sp.get("off", "ce") == "hinge":
                off = F.relu(margin_of(out.float(), yo.argmax(-1)) + sp.get("moff", 5.0)).mean()
            else:
                off = self.off_term(out, yo, loss_fn)
            trap = bounded(off, cfg.bound)
            if cfg.collateral:
                trap = trap + cfg.collateral * disruption(seen[-1], base)
            term = (-lam * every * scale_weight(cfg.weight, s) / len(scales)) * trap
            term.backward()
            j += float(term.detach())
            offs.append(float(off.detach()))
        return StepStats(
            loss=j, nominal=float(nominal.detach()), off_nominal=sum(offs) / len(offs), scales=scales
        )


def parse(spec: str) -> dict:
    out = {}
    for kv in spec.split(","):
        k, v = kv.split("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = None if (v == "none" and k == "bound") else v
    return out


def suite_batch(suite) -> int:
    """The batch size of the suite's LoRA recipe (the plain run the original came from)."""
    return BenchConfig().train_config(suite, "lora").batch_size


def plain_step_seconds(suite, target, steps=20, rounds=3):
    cfg = TrainConfig(
        steps=10_000,
        batch_size=suite_batch(suite),
        warmup_steps=1,
        eval_every=10_000,
        objective=ObjectiveConfig(name="none"),
    )
    run = _setup(suite, target, cfg, None)
    _step(run, 1)
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(steps):
            _step(run, 2 + r * steps + i)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def run_one(suite, target, orig, sp, plain_s, plain_steps):
    steps = sp.get("steps", 90)
    obj = ObjectiveConfig(
        name="trap2_distill",
        lam=sp.get("lam", 0.1),
        delta=sp.get("delta", 0.05),
        law=sp.get("law", "uniform"),
        weight=sp.get("weight", "inv"),
        bound=sp.get("bound"),
        collateral=sp.get("coll", 0.0),
        s_min=sp.get("s_min", 0.05),
        s_max=sp.get("s_max", 2.0),
    )
    train = TrainConfig(
        objective=obj,
        steps=max(steps, 1),
        warmup_steps=sp.get("warm", 10),
        eval_every=10_000,
        lr=sp.get("lr", 5e-3),
        batch_size=sp.get("bs", suite_batch(suite)),
        seed=sp.get("seed", 0),
        eps=sp.get("eps", TrainConfig().eps),
        betas=(0.9, sp.get("b2", TrainConfig().betas[1])),
    )
    cfg = ProtectConfig(train=train, temperature=sp.get("T", 1.0))
    update = pad_rank(orig, sp["rank"]) if sp.get("rank") else orig
    t0 = time.perf_counter()
    inputs = mixup_inputs(suite.task(target).train.x, sp["aug"], sp.get("seed", 0)) if sp.get("aug") else None
    p = prepare_protect(suite, update, cfg, inputs=inputs, force=True)
    p.run.objective = Exp(p.run.cfg.objective, sp.get("T", 1.0), sp, steps)
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        if step == int(sp.get("cut", 0) * steps) + 1:  # the repair phase's own ε and lr multiplier
            for group in p.run.opt.param_groups:
                group["eps"] = sp.get("reps", group["eps"])
            p.run.sched.base_lrs = [lr * sp.get("rlr", 1.0) for lr in p.run.sched.base_lrs]
        _step(p.run, step)
    t2 = time.perf_counter()
    released = _release(p.run, suite, target)
    agree, acc, acc_t = _agreement(p.run.model, p.task.test.x, p.test_teacher, p.task.test.y)
    curve = scaling_curve(suite.make_backbone(), p.task, released.update.dense(), CURVE_S)
    train_s = t2 - t1
    return {
        "spec": sp,
        "agreement_test": round(agree, 4),
        "acc_original": round(acc_t, 4),
        "acc_protected": round(acc, 4),
        "curve": [round(c, 3) for c in curve],
        "prepare_seconds": round(t1 - t0, 3),
        "train_seconds": round(train_s, 3),
        "step_ms": round(1000 * train_s / max(steps, 1), 2),
        "cost_vs_plain600": round(train_s / (plain_steps * plain_s), 3),  # the original's plain steps
    }


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the JSON to write (rows are appended to an existing one)")
    ap.add_argument("specs", nargs="+", help="comma-separated k=v settings, one row each")
    ap.add_argument("--suite", default="digits")
    ap.add_argument("--target", help="the original's task (default: the suite's default target)")
    ap.add_argument("--original", help="the update to protect (default on digits: the demo's plain rot90)")
    ap.add_argument("--plain-steps", type=int, default=600, help="the original's plain training steps")
    args = ap.parse_args()
    t_start = time.perf_counter()
    suite = get_suite(args.suite)
    target = args.target or suite.default_target
    plain_steps = args.plain_steps
    orig_path = args.original
    if orig_path is None:
        if suite.name != "digits":
            ap.error("--original UPDATE is required outside digits")
        orig_path = str(update_cache_folder(suite, target, DemoConfig().train.plain(), DEMO_CACHE))
    out, specs = args.out, args.specs
    orig = load_update(orig_path)
    plain_s = plain_step_seconds(suite, target)
    budget = 0.3 * plain_steps * plain_s
    print(f"plain step {1000 * plain_s:.2f} ms; 0.3x budget = {budget:.2f} s", flush=True)
    rows = json.loads(Path(out).read_text())["rows"] if os.path.exists(out) else []
    for spec in specs:
        sp = parse(spec)
        r = run_one(suite, target, orig, sp, plain_s, plain_steps)
        r["spec_str"], r["plain_step_ms"] = spec, round(1000 * plain_s, 2)
        rows.append(r)
        c = r["curve"]
        print(
            f"{spec:60} agree {100 * r['agreement_test']:.1f} acc {100 * r['acc_protected']:.1f} "
            f"s.25 {100 * c[2]:.0f} s.5 {100 * c[3]:.0f} s.9 {100 * c[5]:.0f} s1.1 {100 * c[7]:.0f} "
            f"s2 {100 * c[10]:.0f} cost {r['cost_vs_plain600']:.3f} ({r['step_ms']} ms)",
            flush=True,
        )
        write_json(out, {
            "kind": "protect-sweep",
            "command": "python " + " ".join(sys.argv),
            "version": __version__,
            "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), shared",
            "wall_seconds": round(time.perf_counter() - t_start, 1),
            "suite": suite.name,
            "target": target,
            "plain_steps": plain_steps,
            "original": orig_path,
            "curve_s": CURVE_S,
            "rows": rows,
        })  # fmt: skip


if __name__ == "__main__":
    main()
