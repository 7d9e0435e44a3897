"""The hardened objective's lookahead (trap2.objectives.lookahead): the trap term is measured after the
attacker's first-order steps, its gradient taken there; checked against a manual two-step computation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_operators import Wide, full_model

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.objectives import get_objective
from trap2.objectives.trap2 import sample_scales
from trap2.scaling import ScaledModel


def _loss_at(net, w0, params, x, y, s):
    """L(W0 + s·(θ − W0)) through functional_call, differentiable in ``params`` (a name -> tensor dict)."""
    from torch.func import functional_call

    return F.cross_entropy(functional_call(net, {n: w0[n] + s * (params[n] - w0[n]) for n in w0}, (x,)), y)


@pytest.mark.parametrize("attacker", ["recover", "flatten"])
@pytest.mark.parametrize("update", ["sgd", "adam"])
def test_lookahead_gradient_equals_the_manual_steps(attacker, update):
    model, w0 = full_model(3)
    net = model.model
    reference = copy.deepcopy(net)
    x, y = torch.randn(10, 10, dtype=torch.float64), torch.randint(0, 7, (10,))
    cfg = ObjectiveConfig(
        lam=0.3, lookahead_steps=2, lookahead_lr=0.05, lookahead_objective=attacker, lookahead_update=update
    )
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    st = get_objective(cfg).backward(model, x, y, F.cross_entropy, torch.Generator().manual_seed(1))
    (s,) = sample_scales(cfg, 1, torch.Generator().manual_seed(1))
    assert st.scales == [s]
    for n, p in net.named_parameters():  # the attacker's steps are undone exactly
        assert torch.equal(p.detach(), before[n]), n

    # by hand: θ_{i+1} = θ_i − η·u(∇L_att(θ_i)); gradient = ∇L(1)(θ) − λ/s·∇L(s)(θ_2)
    theta = {n: p.detach().clone() for n, p in reference.named_parameters()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t in (1, 2):
        leaf = {n: x_.clone().requires_grad_(True) for n, x_ in theta.items()}
        att = _loss_at(reference, w0, leaf, x, y, s)
        if attacker == "flatten":
            att = att + _loss_at(reference, w0, leaf, x, y, 1.0)
        grads = dict(zip(leaf, torch.autograd.grad(att, list(leaf.values())), strict=True))
        for n, g in grads.items():
            if update == "sgd":
                theta[n] = theta[n] - 0.05 * g
            else:
                m[n] = 0.9 * m[n] + 0.1 * g
                v[n] = 0.999 * v[n] + 0.001 * g * g
                theta[n] = theta[n] - 0.05 * (m[n] / (1 - 0.9**t)) / ((v[n] / (1 - 0.999**t)).sqrt() + 1e-8)
    at_theta = {n: p.detach().clone().requires_grad_(True) for n, p in reference.named_parameters()}
    nominal = _loss_at(reference, w0, at_theta, x, y, 1.0)
    g_nom = torch.autograd.grad(nominal, list(at_theta.values()))
    at_theta2 = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    trap = -cfg.lam / s * _loss_at(reference, w0, at_theta2, x, y, s)
    g_trap = torch.autograd.grad(trap, list(at_theta2.values()))
    assert st.loss == pytest.approx(float((nominal + trap).detach()), rel=1e-10)
    for (n, p), a, b in zip(net.named_parameters(), g_nom, g_trap, strict=True):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-9, atol=1e-11, msg=n)
    # and the lookahead moved the point: without it the gradient differs
    plain = copy.deepcopy(reference)
    get_objective(ObjectiveConfig(lam=0.3)).backward(
        ScaledModel(plain, "full", w0), x, y, F.cross_entropy, torch.Generator().manual_seed(1)
    )
    assert any(
        not torch.allclose(p.grad, q.grad) for p, q in zip(net.parameters(), plain.parameters(), strict=True)
    )


def test_lookahead_gradient_matches_finite_differences_at_the_attacked_point():
    """With g detached, the trap part of the gradient is ∇T at θ_1: a central difference of T along a
    direction, taken around θ_1, agrees with it."""
    model, w0 = full_model(4)
    net = model.model
    x, y = torch.randn(10, 10, dtype=torch.float64), torch.randint(0, 7, (10,))
    cfg = ObjectiveConfig(lam=0.5, lookahead_steps=1, lookahead_lr=0.1, lookahead_update="sgd")
    get_objective(cfg).backward(model, x, y, F.cross_entropy, torch.Generator().manual_seed(2))
    with_lookahead = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    nominal = F.cross_entropy(net(x), y)
    nominal.backward()
    trap_grad = [a - p.grad for a, p in zip(with_lookahead, net.parameters(), strict=True)]
    (s,) = sample_scales(cfg, 1, torch.Generator().manual_seed(2))
    params = list(net.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x, s), y), params)
    direction = [torch.randn_like(p) for p in params]

    def trap_at(eps):
        with torch.no_grad():
            for p, gi, di in zip(params, g, direction, strict=True):
                p.sub_(0.1 * gi).add_(eps * di)
            value = -cfg.lam / s * F.cross_entropy(model(x, s), y)
            for p, gi, di in zip(params, g, direction, strict=True):
                p.add_(0.1 * gi).sub_(eps * di)
        return float(value)

    h = 1e-6
    numeric = (trap_at(h) - trap_at(-h)) / (2 * h)
    analytic = sum(float((tg * di).sum()) for tg, di in zip(trap_grad, direction, strict=True))
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_lookahead_on_lora_with_operators_restores_the_factors():
    torch.manual_seed(0)
    model = get_peft_model(
        Wide().double(), LoraConfig(r=4, lora_alpha=6, target_modules=["fc1", "fc2"], init_lora_weights=False)
    )
    scaled = ScaledModel(model, "lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(10, 10, dtype=torch.float64), torch.randint(0, 7, (10,))
    cfg = ObjectiveConfig(
        lam=0.3, operators="trim,spectral", n_samples=2, lookahead_steps=3, lookahead_objective="flatten"
    )
    st = get_objective(cfg).backward(scaled, x, y, F.cross_entropy, torch.Generator().manual_seed(0))
    assert len(st.scales) == 2 and st.off_nominal > 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        if "lora_" in n:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n


def test_lookahead_and_operators_are_refused_where_they_are_not_implemented():
    with pytest.raises(ConfigError, match="lookahead_steps is a Trap² knob"):
        get_objective(ObjectiveConfig(name="flatten", lookahead_steps=1))
    with pytest.raises(ConfigError, match="two-pass 'trap2' objective only"):
        get_objective(ObjectiveConfig(name="trap2_split", operators="trim"))
    with pytest.raises(ConfigError, match="two-pass 'trap2' objective only"):
        get_objective(ObjectiveConfig(name="trap2_split", lookahead_steps=1))
