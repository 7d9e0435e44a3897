import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
from attack_checks import reevaluated

from trap2.attacks import EvalContext, run_attack
from trap2.attacks.peft_bridge import peft_weighted_merge
from trap2.config import ObjectiveConfig, TrainConfig
from trap2.errors import ConfigError, UpdateFileError
from trap2.eval import accuracy
from trap2.merge_job import merge_files
from trap2.merging import merge_updates
from trap2.suites.digits import load_backbone
from trap2.training import train_update
from trap2.updates import LowRank, Update, apply_delta, load_update

CFG = TrainConfig(steps=40, eval_every=40, warmup_steps=5)


@pytest.fixture(scope="session")
def pool(digits, tmp_path_factory):
    """8 short plain LoRA updates and one Trap² update of rot90, saved as PEFT folders."""
    root = tmp_path_factory.mktemp("pool")
    paths = {}
    for t in digits.task_names:
        r = train_update(digits, t, dataclasses.replace(CFG, objective=ObjectiveConfig(name="none")))
        paths[t] = r.update.save(root / t, peft_model=r.peft_model)
    r = train_update(digits, "rot90", CFG)
    paths["protected"] = r.update.save(root / "protected", peft_model=r.peft_model)
    return paths


@pytest.fixture(scope="session")
def plain(digits, pool):
    """The 8 unprotected updates, in the suite's task order."""
    return [load_update(pool[t]) for t in digits.task_names]


@pytest.fixture(scope="session")
def ctx(digits, plain):
    return EvalContext.normalised_by(digits, dict(zip(digits.task_names, plain, strict=True)))


def test_normalisers_are_each_tasks_own_validation_accuracy(ctx, digits, plain):
    for t, u in zip(digits.task_names, plain, strict=True):
        assert ctx.normalisers[t] == ctx.accuracies(apply_delta(ctx.w0, u.dense()), "val")[t]


def test_batched_evaluation_equals_per_task(ctx, digits, plain):
    params = apply_delta(ctx.w0, plain[0].dense(), 0.7)
    batched = ctx.accuracies(params, "val")
    for t in digits.task_names:
        assert batched[t] == accuracy(ctx.backbone, digits.task(t), "val", params)


def test_global_search_costs_one_evaluation_per_point(ctx, plain):
    rec = run_attack(ctx, plain, "ties", "full", "global")
    tried_to = round(rec["coefficient"] / 0.1)
    assert rec["evaluations"] <= tried_to + 10  # up to the best point, then the early-stop window
    assert rec["val_score"] == reevaluated(ctx, plain, rec)


@pytest.mark.parametrize("method", ["ta", pytest.param("ties", marks=pytest.mark.slow)])
def test_per_task_search_reports_the_weights_it_scores(ctx, plain, method):
    """Re-merged at the reported weights, the record scores what it says (task arithmetic, whose points
    are linear, and TIES, whose every point is a merge); the must-move case is in test_search."""
    p = run_attack(ctx, plain, method, "full", "per_task")
    assert len(p["coefficients"]) == 8
    assert p["val_score"] == reevaluated(ctx, plain, p)


def test_pinned_keeps_the_protected_member_at_one(ctx, plain):
    rec = run_attack(ctx, plain, "ties", "full", "pinned", protected_index=0)
    assert rec["coefficients"][0] == 1.0 and len(set(rec["coefficients"][1:])) == 1
    assert rec["val_score"] == reevaluated(ctx, plain, rec)
    with pytest.raises(ConfigError, match="pinned"):
        run_attack(ctx, plain, "ta", "full", "pinned")


@pytest.mark.slow
def test_hparam_search_reports_the_setting_it_scores(ctx, plain):
    """CART's ρ and β are walked over their grids; the record's score is that of its reported ρ, β, c
    (that β is walked to a strictly better value is shown on a hand-built pool in test_search)."""
    from trap2.merging import get_merge_method

    tuned = run_attack(ctx, plain, "cart", "full", "global", hparam_search=True)
    grids = get_merge_method("cart").hparams
    assert tuned["hparams"]["rho"] in grids["rho"].grid and tuned["hparams"]["beta"] in grids["beta"].grid
    assert tuned["val_score"] == reevaluated(ctx, plain, tuned)


def test_peft_cat_is_exact_task_arithmetic_and_linear_is_not(digits, pool):
    paths = [pool[t] for t in ("flip", "invert", "rot90")]
    weights = [0.5, 0.3, 0.2]
    ours = merge_updates([load_update(p) for p in paths], "ta", weights=weights).dense()
    cat = peft_weighted_merge(load_backbone, paths, weights, "cat").dense()
    linear = peft_weighted_merge(load_backbone, paths, weights, "linear").dense()
    for k in ours:
        torch.testing.assert_close(cat[k], ours[k], rtol=1e-4, atol=1e-6)
    assert max(float((linear[k] - ours[k]).abs().max()) for k in ours) > 1e-3
    svd = peft_weighted_merge(load_backbone, paths, weights, "svd", svd_rank=4)
    assert all(d.rank == 4 for d in svd.deltas.values())
    with pytest.raises(ConfigError, match="unknown PEFT combination_type"):
        peft_weighted_merge(load_backbone, paths, weights, "slerp")


def test_merge_job_outputs(tmp_path, pool, digits):
    paths = [pool[t] for t in digits.task_names]
    r = merge_files(paths, "digits", "ta", "core", tmp_path / "core", coefficient=0.3)
    assert r.update.kind == "lora"  # low-rank result: written as a PEFT adapter
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PeftModel.from_pretrained(load_backbone(), tmp_path / "core")
    full = merge_files(
        paths, "digits", "ta", "full", tmp_path / "full", coefficient=0.3, merged_checkpoint=True
    )
    x = digits.task("flip").val.x[:16]
    expected = torch.func.functional_call(
        load_backbone(), apply_delta(dict(load_backbone().named_parameters()), full.update.dense()), (x,)
    )
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    ckpt = load_backbone()
    ckpt.load_state_dict(
        dict(__import__("safetensors.torch").torch.load_file(tmp_path / "full" / "model.safetensors"))
    )
    torch.testing.assert_close(ckpt(x), expected, rtol=1e-4, atol=1e-5)
    searched = merge_files(paths, "digits", "ties", "knots", tmp_path / "s", search_suite="digits")
    assert searched.search["points"] >= 11 and 0 < searched.search["test_acc"]["mean"] <= 1


def test_lazy_and_eager_merges_agree(pool, digits):
    paths = [pool[t] for t in digits.task_names]
    eager = merge_updates([load_update(p) for p in paths], "dare_ties", "knots", p=0.3, k=50.0).dense()
    lazy = merge_updates(
        [load_update(p, lazy=True) for p in paths], "dare_ties", "knots", p=0.3, k=50.0
    ).dense()
    for k in eager:
        assert torch.equal(eager[k], lazy[k])


def test_merge_refuses_bad_inputs_and_writes_nothing(tmp_path, pool):
    wrong_shape = tmp_path / "wrong"
    Update({"blocks.0.fc1.weight": torch.zeros(3, 3)}).save(wrong_shape)
    other_base = tmp_path / "other"
    Update({"blocks.0.fc1.weight": torch.zeros(128, 64)}, {"base_fingerprint": "0" * 64}).save(other_base)
    cases = [
        ([pool["flip"], wrong_shape], {}, UpdateFileError, "shape"),
        ([pool["flip"], other_base], {}, UpdateFileError, "made for base"),
        ([pool["flip"]], {"method": "slerp"}, Exception, "unknown merge method 'slerp'"),
        ([pool["flip"]], {"space": "tucker"}, Exception, "unknown merge space 'tucker'"),
        ([pool["flip"]], {"method": "dare", "hparams": {"p": 1.0}}, ConfigError, r"p=1.0 is out of range"),
        (
            [pool["flip"], pool["invert"]],
            {"coefficient": 1.0, "search_suite": "digits"},
            ConfigError,
            "either",
        ),
        ([wrong_shape], {"search_suite": "digits"}, UpdateFileError, "shape"),
    ]
    for paths, kw, exc, msg in cases:
        args = {"method": "ta", "space": "full", **kw}
        with pytest.raises(exc, match=msg):
            merge_files(paths, "digits", args.pop("method"), args.pop("space"), tmp_path / "out", **args)
        assert not (tmp_path / "out").exists()


def test_merge_cli(tmp_path, pool):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "trap2.cli",
            "merge",
            str(pool["flip"]),
            str(pool["invert"]),
            "--base",
            "digits",
            "--method",
            "ties",
            "--hparam",
            "k=50",
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert load_update(tmp_path / "m").meta["merge"]["hparams"]["k"] == 50.0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "trap2.cli",
            "merge",
            str(pool["flip"]),
            "--base",
            "digits",
            "--method",
            "ties",
            "--hparam",
            "k=0",
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "k=0.0 is out of range" in bad.stderr and not (tmp_path / "bad").exists()


def test_mixed_lora_and_dense_inputs(tmp_path, pool):
    lora = load_update(pool["flip"])
    dense_path = tmp_path / "dense"
    Update({k: 0.01 * torch.ones_like(v) for k, v in lora.dense().items()}).save(dense_path)
    r = merge_files([pool["flip"], dense_path], "digits", "ta", "full", tmp_path / "out", coefficient=2.0)
    assert r.update.kind == "dense"
    for k, v in lora.dense().items():
        torch.testing.assert_close(r.update.dense()[k], 2.0 * (v + 0.01), rtol=1e-5, atol=1e-6)
    # LoRA inputs of different ranks, task arithmetic in full space: concatenated, still an adapter
    ups = [load_update(pool["flip"]), load_update(pool["invert"])]
    cat = merge_updates(ups, "ta")
    d = next(iter(cat.deltas.values()))
    assert isinstance(d, LowRank) and d.rank == 16
    for k, v in merge_updates(ups, "ta", "knots").dense().items():
        torch.testing.assert_close(cat.dense()[k], v, rtol=1e-4, atol=1e-5)


def test_regmean_kernel_equal_grams_is_the_average_and_otherwise_least_squares():
    from trap2.attacks.regmean import regmean_weight

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    same = [x.T @ x] * 3
    torch.testing.assert_close(regmean_weight(ws, same, alpha=0.9), sum(ws) / 3)  # = TA with c = 1/n
    xs = [torch.randn(30, 7, generator=g, dtype=torch.float64) for _ in ws]
    got = regmean_weight(ws, [xi.T @ xi for xi in xs], alpha=1.0)
    # independent reference: min_W Σ‖X_i Wᵀ − X_i W_iᵀ‖² by least squares on the stacked inputs
    ref = torch.linalg.lstsq(
        torch.cat(xs), torch.cat([xi @ w.T for xi, w in zip(xs, ws, strict=True)])
    ).solution.T
    torch.testing.assert_close(got, ref)
    with pytest.raises(ConfigError, match="alpha"):
        regmean_weight(ws, same, alpha=1.5)


def test_regmean_of_one_update_repeated_is_that_update(ctx, digits, plain):
    from trap2.attacks.regmean import regmean_delta

    d = plain[0].dense()
    x = digits.task(digits.task_names[0]).train.x[:32]
    merged = regmean_delta(ctx.backbone, ctx.w0, [d, d], [x, digits.task("flip").train.x[:32]])
    assert merged.keys() == d.keys()
    for n in d:
        torch.testing.assert_close(merged[n], d[n], rtol=1e-4, atol=1e-5)


def test_regmean_and_restore_attacks_run_in_the_matrix(ctx, pool, plain):
    from trap2.attacks import restore_member

    rec = run_attack(ctx, plain, "regmean", "full", "global")
    assert rec["method"] == "regmean" and 0.0 <= rec["acc"]["mean"] <= 1.0 and rec["evaluations"] > 0
    with pytest.raises(ConfigError, match="full space"):
        run_attack(ctx, plain, "regmean", "knots", "global")
    with pytest.raises(ConfigError, match="full space"):
        run_attack(ctx, plain, "regmean", "full", "per_task")

    protected = [load_update(pool["protected"]), *plain[1:]]
    r = run_attack(ctx, protected, "ties", "full", "restore", protected_index=0)
    assert r["coefficients"][0] == 1.0 and set(r["coefficients"][1:]) == {r["coefficient"]}
    assert r["val_score"] == reevaluated(ctx, protected, r, protected_index=0)
    merged = merge_updates(protected, "ties", "full").dense()
    member = protected[0].dense()
    rest = restore_member(merged, member)
    for n, d in member.items():  # what is left is orthogonal to the member, and adds back to the merge
        assert abs(float((rest[n].double() * d.double()).sum())) < 1e-6 * float(
            d.norm() * merged[n].norm() + 1e-12
        )
        a = float((merged[n].double() * d.double()).sum() / (d.double() ** 2).sum())
        torch.testing.assert_close(rest[n] + a * d, merged[n], rtol=1e-5, atol=1e-6)


def test_demo_cells_place_regmean_and_restore():
    from trap2.demo import DemoConfig

    cfg = DemoConfig(
        methods=("ta", "ties", "regmean"), spaces=("full", "knots"), extra_searches=("pinned", "restore")
    )
    assert cfg.cells() == [
        ("ta", "full", "global"),
        ("ties", "full", "global"),
        ("ties", "knots", "global"),
        ("regmean", "full", "global"),
        ("ta", "full", "pinned"),
        ("ties", "full", "restore"),
        ("ties", "knots", "restore"),
        ("regmean", "full", "restore"),
    ]
    with pytest.raises(ConfigError, match="per_task, pinned, restore"):
        DemoConfig(extra_searches=("greedy",))
    cfg = DemoConfig(methods=("ta", "ties"), spaces=("full",), extra_searches=("prodistill", "recover10"))
    assert cfg.cells() == [
        ("ta", "full", "global"),
        ("ties", "full", "global"),
        ("ta", "full", "prodistill"),
        ("ta", "full", "recover10"),
        ("ties", "full", "recover10"),
    ]


def test_prodistill_learns_each_members_own_coefficients(ctx, digits, plain):
    from trap2.attacks.prodistill import distill_coefficients, merged_delta

    d = plain[0].dense()
    x = digits.task(digits.task_names[0]).train.x[:64]
    # one member distilled from its own model: the optimum is c = 1 on every tensor
    coef, names, history = distill_coefficients(ctx.backbone, ctx.w0, [d], [x], init=0.3, steps=80, lr=0.05)
    assert coef.shape == (1, len(d)) and set(names) == set(d)
    assert history[-1] < 0.05 * history[0]
    assert float((coef - 1).abs().mean()) < 0.15
    merged = merged_delta([d, d], torch.stack([coef[0], 2 * coef[0]]), names)
    for j, n in enumerate(names):  # Σ_i c_{i,n} ΔW_{i,n}, checked by hand
        torch.testing.assert_close(merged[n], 3 * float(coef[0, j]) * d[n])
    with pytest.raises(ConfigError, match="one input batch per member"):
        distill_coefficients(ctx.backbone, ctx.w0, [d, d], [x])


def test_prodistill_search_reports_the_coefficients_it_scores_and_needs_ta(ctx, plain):
    g = run_attack(ctx, plain, "ta", "full", "global")
    p = run_attack(ctx, plain, "ta", "full", "prodistill")
    assert p["search"] == "prodistill" and p["evaluations"] == g["evaluations"] + 1  # one more val pass
    # the distilled per-tensor coefficients (or, when they validate worse, the global c) re-merged
    assert p["val_score"] == reevaluated(ctx, plain, p)
    if "tensor_coefficients" in p:
        assert p["val_score"] > g["val_score"]
        per_member = [sum(cs[i] for cs in p["tensor_coefficients"].values()) for i in range(len(plain))]
        n = len(p["tensor_coefficients"])
        assert p["coefficients"] == pytest.approx([v / n for v in per_member])
    else:
        assert (p["val_score"], p["coefficients"]) == (g["val_score"], g["coefficients"])
    with pytest.raises(ConfigError, match="runs with merge method 'ta' only"):
        run_attack(ctx, plain, "ties", "full", "prodistill")


def test_recovery_fine_tunes_the_merge_on_k_samples_per_task(ctx, digits, plain):
    from trap2.attacks.recover import recover

    tasks = digits.task_names
    zero = {n: torch.zeros_like(v) for n, v in plain[0].dense().items()}
    assert all(torch.equal(v, zero[n]) for n, v in recover(digits, tasks, ctx.w0, zero, 10, steps=0).items())
    before = ctx.test_accs(ctx.w0)["mean"]
    after = ctx.test_accs(ctx.params(recover(digits, tasks, ctx.w0, zero, 100, steps=60)))["mean"]
    assert after > before + 0.05  # 100 labelled samples per task buy accuracy back from W0
    rec = run_attack(ctx, plain, "ta", "full", "recover10")
    assert rec["search"] == "recover10" and 0.0 < rec["acc"]["mean"] <= 1.0
    # the W0 reference: the same recovery from W0, once per k (the same object when asked again)
    assert rec["from_w0"] is ctx.recovered_from_w0(10, list(zero)) and 0.0 < rec["from_w0"]["mean"] <= 1.0


@pytest.mark.slow
def test_untrapping_flattens_a_protected_update(digits, ctx, plain):
    from trap2.attacks.untrap import untrap
    from trap2.eval.evaluate import scaling_curve

    protected = train_update(digits, "rot90", TrainConfig(steps=400, eval_every=400)).update
    before = scaling_curve(ctx.backbone, digits.task("rot90"), protected.dense(), (0.5, 1.0))
    assert before[0] < 0.3 < 0.8 < before[1]  # the trap has formed: chance at s = 0.5
    after_update = untrap(digits, protected, "rot90", k=100, steps=100)
    after = scaling_curve(ctx.backbone, digits.task("rot90"), after_update.dense(), (0.5, 1.0))
    assert after[0] > 0.6 and after[1] > 0.8  # 100 labelled samples and 100 steps flatten it
    assert after_update.meta["untrap"] == {"k": 100, "steps": 100}

    pool = [protected if t == "rot90" else u for t, u in zip(digits.task_names, plain, strict=True)]
    i = digits.task_names.index("rot90")
    rec = run_attack(ctx, pool, "ta", "full", "untrap", protected_index=i)
    assert rec["search"] == "untrap" and ctx.untrapped(protected) is ctx.untrapped(protected)
    untrapped_pool = [ctx.untrapped(u) if j == i else u for j, u in enumerate(pool)]
    assert rec["val_score"] == reevaluated(ctx, untrapped_pool, rec)
    plain = run_attack(ctx, pool, "ta", "full", "global")
    assert rec["acc"]["rot90"] > plain["acc"]["rot90"]  # the merge recovers the protected task
