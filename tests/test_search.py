import math

import pytest
import torch
from attack_checks import reevaluated
from torch import nn

from trap2.attacks import PAPER_GRID, EvalContext, run_attack, search_coefficient
from trap2.errors import ConfigError
from trap2.merging import get_merge_method
from trap2.suites.base import Split, Suite, Task
from trap2.updates import Update


def test_paper_grid():
    assert PAPER_GRID[0] == 0.1 and PAPER_GRID[-1] == 9.9 and len(PAPER_GRID) == 99


def test_finds_the_peak_and_stops_early():
    calls = []

    def score(c):
        calls.append(c)
        return -((c - 0.7) ** 2)

    r = search_coefficient(score)
    assert r.coefficient == 0.7
    assert len(calls) == 7 + 10  # up to the peak, then 10 points without improvement


def test_no_early_stop_scans_everything_and_first_best_wins_ties():
    r = search_coefficient(lambda c: 1.0 if c in (0.3, 0.5) else 0.0, patience=None)
    assert r.coefficient == 0.3 and len(r.tried) == 99


# --- searches on a hand-built linear suite: every optimum is known in closed form ---------------------


def linear_suite(d: int = 3, repeat: int = 4) -> Suite:
    """One task: input e_k has label k; backbone = a bias-free (d, d) linear map with W0 = 0 and the
    identity as head, so a merge is right on e_k iff row k of ΔW wins column k."""
    x = torch.eye(d).repeat(repeat, 1)  # (repeat·d, d)
    y = torch.arange(d).repeat(repeat)
    split = Split(x, y)
    task = Task("t", d, split, split, split, nn.Identity())

    def make_backbone() -> nn.Module:
        net = nn.Linear(d, d, bias=False)
        nn.init.zeros_(net.weight)
        return net

    return Suite("linear", {"t": task}, make_backbone, ("",), "t", "0" * 64)


def unit(k: int, d: int = 3) -> torch.Tensor:
    e = torch.zeros(d, d)
    e[k, k] = 1.0
    return e


def test_cart_kernel_is_the_mean_plus_beta_times_the_rank_reduced_residuals():
    """Choi et al. 2024: τ = mean_t τ_t + β Σ_t SVD_r(τ_t − mean), r = ⌈ρ·min(m, n)⌉; vectors: the mean."""
    cart = get_merge_method("cart")
    # hand-built: τ_t = e_t e_tᵀ + J (J shared) in 3 × 3, so mean = I/3 + J and each residual
    # e_t e_tᵀ − I/3 has singular values 2/3, 1/3, 1/3: its rank-1 part is (2/3) e_t e_tᵀ
    j = torch.zeros(3, 3)
    j[0] = 0.55
    deltas = [unit(k) + j for k in range(3)]
    for beta in (0.1, 0.5, 2.0):
        expected = torch.eye(3) / 3 + j + beta * (2 / 3) * torch.eye(3)
        torch.testing.assert_close(cart(deltas, rho=0.3, beta=beta), expected, rtol=0, atol=1e-6)
    # a random case against an independent float64 computation
    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(6, 5, generator=g) for _ in range(4)]
    mean = torch.stack(ds).double().mean(0)
    r = math.ceil(0.4 * 5)
    ref = mean.clone()
    for t in ds:
        u, s, v = torch.linalg.svd(t.double() - mean)
        ref += 1.5 * (u[:, :r] @ torch.diag(s[:r]) @ v[:r])
    torch.testing.assert_close(cart(ds, rho=0.4, beta=1.5), ref.float(), rtol=1e-5, atol=1e-5)
    bias = [torch.randn(5, generator=g) for _ in range(3)]
    torch.testing.assert_close(cart(bias, rho=0.4, beta=1.5), sum(bias) / 3)


def test_cart_beta_has_the_papers_grid():
    grid = get_merge_method("cart").hparams["beta"].grid
    assert min(grid) <= 0.1 and max(grid) >= 2.0 and 1.0 in grid


def test_hparam_search_walks_cart_beta_to_a_strictly_better_value():
    """With J = 0.55 on row 0, mean + β·Σres = (1/3 + 2β/3)·I + J is right on every input iff
    1/3 + 2β/3 > 0.55: β ∈ {0.1, 0.2} leaves e_1, e_2 wrong at every coefficient c, β = 0.5 gets all."""
    suite = linear_suite()
    ctx = EvalContext(suite, {"t": 1.0})
    j = torch.zeros(3, 3)
    j[0] = 0.55
    pool = [Update({"weight": unit(k) + j}, {"task": "t"}) for k in range(3)]
    pinned = run_attack(ctx, pool, "cart", "full", "global", hparams={"beta": 0.1})  # β fixed by the caller
    assert pinned["hparams"]["beta"] == 0.1 and pinned["val_score"] == pytest.approx(1 / 3)
    for tuned in (
        run_attack(ctx, pool, "cart", "full", "global"),  # β is CART's own weight: always searched
        run_attack(ctx, pool, "cart", "full", "global", hparam_search=True),
        run_attack(ctx, pool, "cart", "full", "global", hparams={"beta": 0.1}, hparam_search=True),
    ):
        assert tuned["hparams"]["beta"] == 0.5  # the first grid value that gets every input right
        assert tuned["val_score"] == 1.0 > pinned["val_score"]
        assert tuned["val_score"] == reevaluated(ctx, pool, tuned)


def hurting_pool() -> list[Update]:
    """e_k e_kᵀ for k = 0, 1, 2 and, first, a member that maps every input to class 0 (row 0 = 2): at any
    common coefficient only e_0 is right; without the first member every input is."""
    bad = torch.zeros(3, 3)
    bad[0] = 2.0
    return [Update({"weight": bad}, {"task": "t"})] + [
        Update({"weight": unit(k)}, {"task": "t"}) for k in range(3)
    ]


@pytest.mark.parametrize(("method", "hparams"), [("ta", {}), ("ties", {"k": 100.0})])
def test_per_task_weights_move_off_a_member_that_only_hurts(method, hparams):
    ctx = EvalContext(linear_suite(), {"t": 1.0})
    pool = hurting_pool()
    g = run_attack(ctx, pool, method, "full", "global", hparams=hparams)
    assert g["val_score"] == pytest.approx(1 / 3)
    p = run_attack(ctx, pool, method, "full", "per_task", hparams=hparams)
    assert p["val_score"] == 1.0 > g["val_score"]
    assert p["coefficients"][0] == 0.0 < min(p["coefficients"][1:])
    assert p["val_score"] == reevaluated(ctx, pool, p)
    assert p["acc"]["t"] == 1.0  # test split = val split here: the same merge scores the same


def test_records_report_the_setting_they_score():
    """Every search's val_score is the score of its reported coefficients and hyperparameters."""
    ctx = EvalContext(linear_suite(), {"t": 1.0})
    pool = hurting_pool()
    for method, search in [
        ("ta", "global"),
        ("ties", "global"),
        ("ties", "pinned"),
        ("dare_ties", "per_task"),
    ]:
        rec = run_attack(ctx, pool, method, "full", search, protected_index=1, hparam_search=True)
        assert rec["val_score"] == reevaluated(ctx, pool, rec), (method, search)


def test_searches_come_from_one_registry():
    from trap2.attacks import SEARCH_REGISTRY, SEARCHES, TA_SEARCHES

    assert SEARCHES[0] == "global" and set(SEARCHES) == set(SEARCH_REGISTRY.names())
    assert SEARCHES[1:5] == ("per_task", "pinned", "restore", "untrap")  # registration order, not sorted
    assert TA_SEARCHES == ("per_task", "pinned", "prodistill")  # the searches flagged ``reweights``
    with pytest.raises(ValueError, match="already registered"):
        from trap2.attacks.searches import search

        search("global", summary="again")(lambda cell, best: None)
    ctx = EvalContext(linear_suite(), {"t": 1.0})
    with pytest.raises(ConfigError, match="unknown search 'greedy'"):
        run_attack(ctx, hurting_pool(), "ta", "full", "greedy")


def test_eval_context_needs_every_normaliser_and_takes_a_device():
    with pytest.raises(ConfigError, match="no normaliser for task 't'"):
        EvalContext(linear_suite(), {})
    pool = hurting_pool()
    default = run_attack(EvalContext(linear_suite(), {"t": 1.0}), pool, "ties", "full", "per_task")
    cpu = run_attack(EvalContext(linear_suite(), {"t": 1.0}, device="cpu"), pool, "ties", "full", "per_task")
    assert cpu == default
    assert EvalContext(linear_suite(), {"t": 1.0}, device="cpu").w0["weight"].device.type == "cpu"
