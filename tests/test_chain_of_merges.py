"""Chain of Merges: RegMean on a one-layer model, a hand-computed two-layer case where the chain's
recomputed statistics change the second layer, and its place among the data-dependent attacks."""

import pytest
import torch
from torch import nn

from trap2.attacks import EvalContext, run_attack
from trap2.attacks.chain_of_merges import chain_of_merges_delta, module_order
from trap2.attacks.regmean import regmean_delta
from trap2.errors import ConfigError
from trap2.eval.evaluate import base_state
from trap2.pipeline import DemoConfig
from trap2.updates import Update


def _members(model, t, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [
        {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
        for _ in range(t)
    ]


def _inputs(t, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(t)]


def test_one_layer_is_regmean():
    model = nn.Linear(5, 3).double()
    w0 = base_state(model)
    deltas, xs = _members(model, 3, 0), _inputs(3, 16, 5, 1)
    com = chain_of_merges_delta(model, w0, deltas, xs)
    reg = regmean_delta(model, w0, deltas, xs)
    assert set(com) == set(reg) == {"weight", "bias"}
    for n in reg:
        torch.testing.assert_close(com[n], reg[n], rtol=0, atol=0)


def _solve(inputs, weights):
    """RegMean with α = 1 by hand: argmin_W Σ_i ‖X_i·Wᵀ − X_i·W_iᵀ‖² (W stored (out, in)), with the
    implementation's ridge of 1e-8 × the Gram's mean diagonal (it moves the answer by ~1e-6 relative,
    more than float64's tolerance, and by a BLAS-dependent amount)."""
    gram = sum(x.T @ x for x in inputs)
    rhs = sum(x.T @ x @ w.T for x, w in zip(inputs, weights, strict=True))
    ridge = 1e-8 * float(torch.diagonal(gram).mean())
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), rhs).T


def test_two_layers_by_hand():
    """x → W1 → W2 (no bias, no non-linearity): layer 1 is RegMean's; layer 2's inputs are X_i·W1*ᵀ
    (the merged first layer), not X_i·W1_iᵀ (member i's own, which RegMean uses)."""
    # a narrowing first layer keeps every Gram matrix invertible (one answer to compare against)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False)).double()
    w0 = base_state(model)
    deltas, xs = _members(model, 2, 2, scale=1.0), _inputs(2, 20, 6, 3)
    w1 = [w0["0.weight"] + d["0.weight"] for d in deltas]
    w2 = [w0["1.weight"] + d["1.weight"] for d in deltas]
    w1_star = _solve(xs, w1)
    w2_chain = _solve([x @ w1_star.T for x in xs], w2)
    w2_regmean = _solve([x @ w.T for x, w in zip(xs, w1, strict=True)], w2)
    com = chain_of_merges_delta(model, w0, deltas, xs, alpha=1.0)
    reg = regmean_delta(model, w0, deltas, xs, alpha=1.0)
    torch.testing.assert_close(com["0.weight"], w1_star - w0["0.weight"])
    torch.testing.assert_close(com["1.weight"], w2_chain - w0["1.weight"])
    torch.testing.assert_close(reg["1.weight"], w2_regmean - w0["1.weight"])
    assert float((com["1.weight"] - reg["1.weight"]).abs().max()) > 1e-2  # the layers interact


def test_norms_before_a_layer_enter_the_chain_merged():
    """A LayerNorm in front of the first linear layer: its averaged parameters shape that layer's
    statistics in the chain (RegMean uses each member's own norm), so the two differ there."""
    model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3)).double()
    assert list(module_order(model, base_state(model), torch.zeros(1, 5, dtype=torch.float64))) == [
        "",
        "0",
        "1",
    ]
    w0 = base_state(model)
    deltas, xs = _members(model, 3, 4), _inputs(3, 16, 5, 5)
    com = chain_of_merges_delta(model, w0, deltas, xs)
    reg = regmean_delta(model, w0, deltas, xs)
    torch.testing.assert_close(com["0.weight"], reg["0.weight"])  # norms: the average in both
    assert not torch.allclose(com["1.weight"], reg["1.weight"])


def test_chain_of_merges_runs_in_the_attack_matrix(digits):
    tasks = digits.task_names[:3]
    ctx = EvalContext(digits, {t: 1.0 for t in tasks}, tasks)
    g = torch.Generator().manual_seed(0)
    pool = [
        Update({n: 0.05 * torch.randn(p.shape, generator=g) for n, p in ctx.w0.items() if p.dim() == 2})
        for _ in tasks
    ]
    rec = run_attack(ctx, pool, "chain_of_merges", "full", "global")
    assert rec["method"] == "chain_of_merges" and rec["val_score"] == pytest.approx(
        reevaluated_com(ctx, pool, rec)
    )
    with pytest.raises(ConfigError, match="chain_of_merges runs in full space"):
        run_attack(ctx, pool, "chain_of_merges", "knots", "global")
    cells = DemoConfig(methods=("ta", "chain_of_merges"), spaces=("full", "knots")).cells()
    assert ("chain_of_merges", "full", "global") in cells and (
        "chain_of_merges",
        "knots",
        "global",
    ) not in cells


def reevaluated_com(ctx, pool, rec):
    from trap2.attacks.regmean import N_SAMPLES

    inputs = [ctx.suite.task(t).train.x[:N_SAMPLES] for t in ctx.tasks]
    merged = chain_of_merges_delta(ctx.backbone, ctx.w0, [u.dense() for u in pool], inputs)
    return ctx.val_score(ctx.params(merged, rec["coefficient"]))
