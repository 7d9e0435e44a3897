import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError, UnknownNameError
from trap2.objectives import OBJECTIVES, get_objective
from trap2.objectives.base import same_random_draws
from trap2.objectives.trap2 import feature_tap, sample_scales, scale_weight
from trap2.scaling import ScaledModel, base_params
from trap2.suites.base import CosineHead, TaskModel


def test_registry_lists_and_rejects():
    assert {"none", "trap2"} <= set(OBJECTIVES.names())
    with pytest.raises(UnknownNameError, match="valid: flatten, none, trap2, trap2_distill, trap2_split"):
        get_objective("trap3")
    with pytest.raises(ValueError, match="already registered"):
        OBJECTIVES.register("trap2", OBJECTIVES.get("trap2"))


def test_scales_cover_both_sides_and_avoid_the_band():
    cfg = ObjectiveConfig(s_min=0.05, s_max=2.0, delta=0.05)
    s = torch.tensor(sample_scales(cfg, 20000, torch.Generator().manual_seed(0)))
    assert s.min() >= 0.05 and s.max() <= 2.0
    assert not ((s > 0.95) & (s < 1.05)).any()
    # length-weighted: P(s < 1) = 0.9 / (0.9 + 0.95)
    assert abs(float((s < 1).float().mean()) - 0.9 / 1.85) < 0.015
    assert (
        scale_weight("inv", 0.25) == 4.0
        and scale_weight("inv_sqrt", 0.25) == 2.0
        and scale_weight("none", 3) == 1
    )


def test_log_law_is_uniform_in_log_s_over_the_same_union():
    cfg = ObjectiveConfig(s_min=0.05, s_max=2.0, delta=0.05, law="log")
    s = torch.tensor(sample_scales(cfg, 40000, torch.Generator().manual_seed(1)), dtype=torch.float64)
    assert s.min() >= 0.05 and s.max() <= 2.0
    assert not ((s > 0.95) & (s < 1.05)).any()
    log = math.log
    total = (log(0.95) - log(0.05)) + (log(2.0) - log(1.05))
    # each interval's mass is its length in log s; [0.05, 0.1] weighs as much as [0.475, 0.95]
    for lo, hi in [(0.05, 0.1), (0.475, 0.95), (1.05, 2.0)]:
        expected = (log(hi) - log(lo)) / total
        assert abs(float(((s >= lo) & (s <= hi)).double().mean()) - expected) < 0.01
    # the paper's law puts 0.05 / 1.85 of its mass on [0.05, 0.1]; log puts ~5x more
    uniform = torch.tensor(sample_scales(ObjectiveConfig(), 40000, torch.Generator().manual_seed(1)))
    assert float((uniform <= 0.1).float().mean()) < 0.035 < 0.15 < float((s <= 0.1).double().mean())
    with pytest.raises(ConfigError, match="objective.law must be one of uniform, log"):
        ObjectiveConfig(law="loguniform")


def _full_model(tiny_net):
    tiny_net = tiny_net.double()
    w0 = base_params(tiny_net)
    with torch.no_grad():  # move away from W0 so ΔW != 0
        for p in tiny_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ScaledModel(tiny_net, "full", w0), w0


def _reference_terms(model, w0, x, y, s, cfg):
    """J's nominal and trap terms written out directly, in one graph, from the formula."""
    params = dict(model.named_parameters())
    at = lambda k: {n: w0[n] + k * (params[n] - w0[n]) for n in w0}  # noqa: E731
    loss = lambda k: F.cross_entropy(functional_call(model, at(k), (x,)), y)  # noqa: E731
    return loss(1.0), -cfg.lam * scale_weight(cfg.weight, s) * loss(s)


def _reference_j(model, w0, x, y, s, cfg):
    nominal, trap = _reference_terms(model, w0, x, y, s, cfg)
    return nominal + trap


@pytest.mark.parametrize("weight", ["inv", "inv_sqrt", "none"])
def test_trap2_gradient_equals_the_formula_full(tiny_net, weight):
    torch.manual_seed(1)
    scaled, w0 = _full_model(tiny_net)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    cfg = ObjectiveConfig(lam=0.3, weight=weight)
    s = sample_scales(cfg, 1, torch.Generator().manual_seed(5))[0]
    st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(5))
    assert st.scales == [s]
    got = {n: p.grad.clone() for n, p in tiny_net.named_parameters()}
    tiny_net.zero_grad()
    ref = _reference_j(tiny_net, w0, x, y, s, cfg)
    ref.backward()
    assert st.loss == pytest.approx(float(ref.detach()), rel=1e-12)
    for n, p in tiny_net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12)


def test_trap2_gradient_matches_finite_differences(tiny_net):
    torch.manual_seed(2)
    scaled, w0 = _full_model(tiny_net)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    cfg = ObjectiveConfig(lam=0.5, bound=3.0)
    s = sample_scales(cfg, 1, torch.Generator().manual_seed(9))[0]
    get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(9))
    params = dict(tiny_net.named_parameters())
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    analytic = sum(float((params[n].grad * direction[n]).sum()) for n in params)

    def j_at(eps):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(eps * direction[n])
            l1 = F.cross_entropy(tiny_net(x), y)
            ls = F.cross_entropy(scaled(x, s), y)
            for n, p in params.items():
                p.sub_(eps * direction[n])
        return float(l1 - cfg.lam / s * 3.0 * torch.tanh(ls / 3.0))

    h = 1e-6
    numeric = (j_at(h) - j_at(-h)) / (2 * h)
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_several_samples_average(tiny_net):
    scaled, w0 = _full_model(tiny_net)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    cfg = ObjectiveConfig(lam=0.2, n_samples=3)
    st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(3))
    assert len(st.scales) == 3
    with torch.no_grad():
        ref = F.cross_entropy(tiny_net(x), y) - sum(
            cfg.lam / s / 3 * F.cross_entropy(scaled(x, s), y) for s in st.scales
        )
    assert st.loss == pytest.approx(float(ref.detach()), rel=1e-12)


def test_same_dropout_mask_for_both_terms_and_stream_unchanged():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(0)
    with same_random_draws(torch.device("cpu")) as replay:
        a = drop(x)
        replay()
        b = drop(x)
    after_protected = torch.rand(3)
    torch.manual_seed(0)
    drop(x)
    after_plain = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(after_protected, after_plain)  # later steps see the plain run's random stream


def test_bound_caps_the_off_nominal_term(tiny_net):
    scaled, _ = _full_model(tiny_net)
    x, y = torch.randn(8, 6, dtype=torch.float64) * 50, torch.randint(0, 5, (8,))
    for bound in (None, 0.5):
        tiny_net.zero_grad()
        cfg = ObjectiveConfig(lam=1.0, bound=bound, weight="none")
        st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(0))
        off_term = st.nominal - st.loss
        if bound is None:
            assert off_term == pytest.approx(st.off_nominal)
        else:
            assert off_term == pytest.approx(0.5 * math.tanh(st.off_nominal / 0.5)) and off_term < 0.5


@pytest.mark.parametrize("rho", [1e-3, 0.02, 1e6])
def test_balance_scales_the_trap_gradient_to_rho_times_the_nominal(tiny_net, rho):
    """g = g_nom + min(1, ρ·‖g_nom‖/‖g_trap‖)·g_trap, g_nom and g_trap taken apart from the formula."""
    torch.manual_seed(3)
    scaled, w0 = _full_model(tiny_net)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    cfg = ObjectiveConfig(lam=0.3, balance=rho)
    s = sample_scales(cfg, 1, torch.Generator().manual_seed(5))[0]
    st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(5))
    got = {n: p.grad.clone() for n, p in tiny_net.named_parameters()}
    params = dict(tiny_net.named_parameters())
    nominal, trap = _reference_terms(tiny_net, w0, x, y, s, cfg)
    g_nom = torch.autograd.grad(nominal, list(params.values()))
    g_trap = torch.autograd.grad(trap, list(params.values()))
    norm = lambda gs: math.sqrt(sum(float((g**2).sum()) for g in gs))  # noqa: E731
    factor = min(1.0, rho * norm(g_nom) / norm(g_trap))
    assert (factor < 1) == (rho < 1e3)  # the large ρ leaves the paper's sum, the small ones scale
    assert st.loss == pytest.approx(
        float((nominal + trap).detach()), rel=1e-12
    )  # J's value is reported unchanged
    for (n, _), gn, gt in zip(params.items(), g_nom, g_trap, strict=True):
        torch.testing.assert_close(got[n], gn + factor * gt, rtol=1e-6, atol=1e-10)


def test_balance_off_is_the_paper_step_bit_for_bit(tiny_net):
    scaled, _ = _full_model(tiny_net)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    grads = []
    for balance in (None, 1e12):
        tiny_net.zero_grad()
        cfg = ObjectiveConfig(lam=0.3, balance=balance)
        get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(2))
        grads.append([p.grad.clone() for p in tiny_net.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)  # ρ huge: factor 1, the same sum


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_balance_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="objective.balance"):
        ObjectiveConfig(balance=bad)


@pytest.mark.parametrize("name", ["trap2_split", "flatten"])
def test_balance_is_refused_where_it_is_not_implemented(name):
    with pytest.raises(ConfigError, match="objective.balance"):
        get_objective(ObjectiveConfig(name=name, balance=1.0))


@pytest.mark.parametrize("rho", [1e-2, 0.3])
def test_balance_treats_every_trap_term_as_the_trap(rho):
    """With collateral, two draws per step and a lookahead, g_trap is everything the step adds beyond the
    nominal term's gradient: the same step at λ = 0 gives g_nom, at ρ = None g_nom + g_trap, and under
    balance the step is g_nom + min(1, ρ·‖g_nom‖/‖g_trap‖)·g_trap."""
    model, w0 = _cosine_task_model()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    knobs = dict(collateral=2.0, n_samples=2, lookahead_steps=1, lookahead_lr=1e-2)
    grads = {}
    for key, lam, balance in (("nom", 0.0, None), ("sum", 0.3, None), ("bal", 0.3, rho)):
        model.zero_grad()
        cfg = ObjectiveConfig(lam=lam, balance=balance, **knobs)
        get_objective(cfg).backward(
            ScaledModel(model, "full", w0), x, y, F.cross_entropy, torch.Generator().manual_seed(7)
        )
        grads[key] = [p.grad.clone() for p in model.parameters()]
    trap = [s - n for s, n in zip(grads["sum"], grads["nom"], strict=True)]
    norm = torch.nn.utils.get_total_norm
    factor = min(1.0, rho * float(norm(grads["nom"])) / float(norm(trap)))
    assert factor < 1  # both ρ scale the trap down here: the test would not tell the sum from the balance
    for got, gn, gt in zip(grads["bal"], grads["nom"], trap, strict=True):
        torch.testing.assert_close(got, gn + factor * gt, rtol=1e-9, atol=1e-12)


def _cosine_task_model():
    torch.manual_seed(4)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8)).double()
    model = TaskModel(backbone, CosineHead(torch.randn(5, 8), logit_scale=10.0).double())
    w0 = base_params(model)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, w0


def test_collateral_gradient_equals_the_formula():
    """J = L(1) − λ·w(s)·(L(s) + μ·mean(1 − cos(f(W0+sΔW), f(W0)))), f the backbone's output."""
    model, w0 = _cosine_task_model()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    cfg = ObjectiveConfig(lam=0.3, collateral=4.0)
    st = get_objective(cfg).backward(
        ScaledModel(model, "full", w0), x, y, F.cross_entropy, torch.Generator().manual_seed(5)
    )
    (s,) = st.scales
    got = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}
    model.zero_grad()

    params = dict(model.named_parameters())
    at = lambda k: {n: w0[n] + k * (params[n] - w0[n]) for n in w0}  # noqa: E731
    bb = {n.removeprefix("backbone."): v for n, v in w0.items() if n.startswith("backbone.")}
    f0 = functional_call(model.backbone, bb, (x,))
    fs = functional_call(model.backbone, {n.removeprefix("backbone."): v for n, v in at(s).items()}, (x,))
    d = (1 - F.cosine_similarity(fs, f0, dim=-1)).mean()
    ref = F.cross_entropy(model(x), y) - cfg.lam / s * (F.cross_entropy(model.head(fs), y) + 4.0 * d)
    ref.backward()
    assert st.loss == pytest.approx(float(ref.detach()), rel=1e-12)
    assert st.disruption == pytest.approx(float(d.detach()), rel=1e-12) and 0 < st.disruption < 2
    for n, p in model.backbone.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12)


def test_collateral_zero_is_the_paper_objective_and_leaves_hooks_behind():
    model, w0 = _cosine_task_model()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    grads = []
    for mu in (0.0, 1e-9, 2.0):
        model.zero_grad()
        st = get_objective(ObjectiveConfig(lam=0.3, collateral=mu)).backward(
            ScaledModel(model, "full", w0), x, y, F.cross_entropy, torch.Generator().manual_seed(5)
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.backbone.parameters()]))
        assert (st.disruption is None) == (mu == 0)
        assert not model.backbone._forward_hooks
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    # μ > 0 pushes the features away from W0's: the gradient changes
    assert float((grads[2] - grads[0]).norm()) > 1e-3 * float(grads[0].norm())


def test_collateral_is_rejected_where_it_is_not_implemented():
    with pytest.raises(ConfigError, match="collateral must be >= 0"):
        ObjectiveConfig(collateral=-1.0)
    for name in ("flatten", "trap2_split"):
        with pytest.raises(ConfigError, match="collateral"):
            get_objective(ObjectiveConfig(name=name, collateral=1.0))


@pytest.mark.parametrize("mu", [0.0, 2.0])
def test_the_feature_tap_is_registered_only_where_collateral_reads_it(mu):
    """The tap holds the backbone output of every forward it sees (B×L×V logits on the math suite):
    with μ = 0 no pass carries it, with μ > 0 only the off-nominal passes do. Gradients are those of
    the tap held around the whole step (how the step ran before)."""
    model, w0 = _cosine_task_model()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    hooks_seen = []

    def loss_fn(logits, target):
        hooks_seen.append(len(model.backbone._forward_hooks))
        return F.cross_entropy(logits, target)

    cfg = ObjectiveConfig(lam=0.3, collateral=mu, n_samples=2)
    get_objective(cfg).backward(
        ScaledModel(model, "full", w0), x, y, loss_fn, torch.Generator().manual_seed(5)
    )
    assert hooks_seen == ([0, 0, 0] if mu == 0 else [0, 1, 1])  # nominal pass, then two off-nominal ones
    assert not model.backbone._forward_hooks
    got = [p.grad.clone() for p in model.backbone.parameters()]
    model.zero_grad()
    scaled = ScaledModel(model, "full", w0)
    with feature_tap(scaled) as seen:  # the tap always on, as before
        get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(5))
    assert len(seen) >= 3  # the outer tap saw every forward
    for g, p in zip(got, model.backbone.parameters(), strict=True):
        assert torch.equal(g, p.grad)


# Recorded from the paper's objective before the hardening extensions (operators, lookahead) existed:
# at their defaults the step must give these numbers (float64, fixed seeds). Bit for bit on the machine
# that recorded them (an Intel Xeon); another CPU's float64 kernels differ in the last bits (an AMD EPYC:
# 2 ulp), so they are compared to 1e-12 relative, far below what a changed draw, weight or pass moves.
PAPER_STEP = {
    ("lora", "paper"): ("0x1.1bd6393e83100p+0", "0x1.7b7ced0ef7da2p+0", "-0x1.390906124c0a8p+2"),
    ("lora", "extended"): ("-0x1.055cab9222b3ep+0", "0x1.f4acd15461cb0p+0", "-0x1.2597581700624p+2"),
    ("full", "paper"): ("0x1.5439aefd72272p-1", "-0x1.1f5eb5109dfd0p-7", "0x1.03d2ed86ffd60p-2"),
    ("full", "extended"): ("-0x1.6fae3811549e6p+0", "-0x1.c94bc2396ce50p-5", "-0x1.2901e41cb477ap+2"),
}


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("variant", ["paper", "extended"])
def test_the_default_step_is_the_one_recorded_before_the_hardening(mode, variant):
    from conftest import TinyNet
    from peft import LoraConfig, get_peft_model

    cfg = {
        "paper": ObjectiveConfig(lam=0.3, n_samples=2),
        "extended": ObjectiveConfig(lam=0.3, law="log", collateral=0.2, bound=2.0),
    }[variant]
    torch.manual_seed(0)
    net = TinyNet().double()
    if mode == "lora":
        net = get_peft_model(
            net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
        )
        scaled = ScaledModel(net, "lora")
    else:
        w0 = base_params(net)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
        scaled = ScaledModel(net, "full", w0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(7))
    g = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    got = (st.loss, float(g.sum()), float((g * torch.arange(g.numel(), dtype=g.dtype)).sum()))
    assert got == pytest.approx(tuple(float.fromhex(v) for v in PAPER_STEP[(mode, variant)]), rel=1e-12)
