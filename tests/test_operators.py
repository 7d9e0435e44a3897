"""The hardened objective's operators (trap2.objectives.operators): each against an independent
reference, the identity rule, and the objective's gradient at an operator draw."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.func import functional_call

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError
from trap2.objectives import get_objective
from trap2.objectives.operators import OPERATORS, Draw, OperatorSpec, draw_operators, relative_distance
from trap2.objectives.operators.spectral import flatten, reweight_dense, reweight_lora, truncate
from trap2.objectives.operators.trim import drop, topk_mask, trim
from trap2.scaling import Dense, Factors, Scale, ScaledModel, base_params


class Wide(nn.Module):
    """Two linear layers wide enough for rank-4 adapters to have a spectrum worth reweighting."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_model(seed=0):
    torch.manual_seed(seed)
    base = Wide().double()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=6, target_modules=["fc1", "fc2"], init_lora_weights=False)
    )
    return ScaledModel(model, "lora"), w0


def full_model(seed=0):
    torch.manual_seed(seed)
    net = Wide().double()
    w0 = base_params(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ScaledModel(net, "full", w0), w0


def dense_deltas(model):
    """{unit name: ΔW} written out from the raw factors / the parameters (not through the units)."""
    out = {}
    if model.kind == "lora":
        for name in ("fc1", "fc2"):
            layer = model.model.base_model.model.get_submodule(name)
            b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            out[f"base_model.model.{name}"] = (b @ a * (6 / 4)).detach()
        return out
    params = dict(model.model.named_parameters())
    return {n: (params[n] - model.w0[n]).detach() for n in model.w0}


def reference_output(model, w0, x, new_deltas):
    """The base network run with W0 + new ΔW (functional_call on a fresh Wide)."""
    weights = dict(w0)
    for name, d in new_deltas.items():
        key = name.removeprefix("base_model.model.")
        key = key if key.endswith(("weight", "bias")) else key + ".weight"
        weights[key] = w0[key] + d
    return functional_call(Wide().double(), weights, (x,))


def test_registry_lists_every_operator_and_rejects_duplicates():
    assert OPERATORS.names() == ["drop", "isotropic", "layer_scale", "scale", "spectral", "trim"]
    with pytest.raises(ValueError, match="already registered"):
        OPERATORS.register("trim", OPERATORS.get("trim"))
    with pytest.raises(ConfigError, match="unknown operator 'ties'; valid: drop, isotropic"):
        ObjectiveConfig(operators="scale,ties")
    with pytest.raises(ConfigError, match="distinct operators"):
        ObjectiveConfig(operators="trim,trim")
    with pytest.raises(ConfigError, match="keep_min <= keep_max"):
        ObjectiveConfig(keep_min=0.8, keep_max=0.5)
    for bad in [dict(lookahead_steps=-1), dict(lookahead_lr=0.0), dict(lookahead_objective="distill")]:
        with pytest.raises(ConfigError, match="lookahead"):
            ObjectiveConfig(**bad)
    assert ObjectiveConfig(operators=["trim", " spectral"]).operators == "trim,spectral"  # YAML lists
    assert not ObjectiveConfig().hardened and ObjectiveConfig(lookahead_steps=1).hardened


def test_trim_keeps_the_top_k_entries_by_magnitude():
    delta = torch.tensor([[3.0, -1.0, 0.2], [0.5, -4.0, 2.0]])
    assert topk_mask(delta, 0.5).tolist() == [[True, False, False], [False, True, True]]
    torch.testing.assert_close(trim(delta, 1 / 3), torch.tensor([[3.0, 0, 0], [0, -4.0, 0]]))
    torch.testing.assert_close(trim(delta, 1e-6), torch.tensor([[0.0, 0, 0], [0, -4.0, 0]]))  # at least one
    torch.testing.assert_close(trim(delta, 1.0), delta)


def test_drop_keeps_a_fraction_and_rescales():
    delta = torch.ones(200, 100)
    out = drop(delta, 0.3, seed=5)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert torch.equal(out, drop(delta, 0.3, seed=5)) and not torch.equal(out, drop(delta, 0.3, seed=6))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_trim_through_the_model_equals_the_hand_merged_weights(kind):
    model, w0 = lora_model() if kind == "lora" else full_model()
    x = torch.randn(9, 10, dtype=torch.float64)
    deltas = dense_deltas(model)
    keep, s = 0.3, 0.7
    want = {n: s * d * topk_mask(d, keep) for n, d in deltas.items()}
    with model.transformed({n: Dense(lambda d: s * trim(d, keep)) for n in deltas}):
        got = model.model(x)
    torch.testing.assert_close(got, reference_output(model, w0, x, want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_layer_scales_equal_a_manual_per_layer_merge(kind):
    model, w0 = lora_model() if kind == "lora" else full_model()
    x = torch.randn(9, 10, dtype=torch.float64)
    deltas = dense_deltas(model)
    scales = {n: 0.2 + 0.3 * i for i, n in enumerate(deltas)}
    with model.transformed({n: Scale(scales[n]) for n in deltas}):
        got = model.model(x)
    want = reference_output(model, w0, x, {n: scales[n] * d for n, d in deltas.items()})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the registered draw gives every unit its own scale, in [s_min, s_max]
    cfg = ObjectiveConfig(operators="layer_scale", s_min=0.1, s_max=1.5)
    d = OPERATORS.get("layer_scale").draw(cfg, model.units(), torch.Generator().manual_seed(0))
    values = [t.s for t in d.transforms.values()]
    assert set(d.transforms) == set(deltas) and len(set(values)) == len(values)
    assert all(0.1 <= v <= 1.5 for v in values) and d.s == pytest.approx(sum(values) / len(values))


def _svd_reweighted(delta, f, s):
    """s·U·diag(f(σ))·Vᵀ from the dense matrix's own SVD (the independent reference)."""
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = int((sigma > sigma[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum())
    return s * (u * f(sigma, rank)) @ vh


@pytest.mark.parametrize("name", ["spectral", "isotropic"])
def test_spectral_on_lora_factors_equals_the_svd_of_the_dense_update(name):
    model, w0 = lora_model()
    x = torch.randn(9, 10, dtype=torch.float64)
    deltas = dense_deltas(model)
    f = truncate(0.5, 0.25) if name == "spectral" else flatten
    s = 0.6
    want = {n: _svd_reweighted(d, f, s) for n, d in deltas.items()}
    units = {u.name: u for u in model.units()}
    for n in deltas:  # the factor form: (P, Q) with P·Q the reweighted dense matrix, rank ≤ r
        p, q = reweight_lora(f, s)(units[n].scaling * units[n].b, units[n].a)
        assert p.shape[1] == q.shape[0] <= 4
        torch.testing.assert_close(p @ q, want[n], rtol=1e-9, atol=1e-11)
    with model.transformed({n: Factors(reweight_lora(f, s)) for n in deltas}):
        got = model.model(x)
    torch.testing.assert_close(got, reference_output(model, w0, x, want), rtol=1e-10, atol=1e-12)
    # the spectrum really changed: rank-4 with 2 kept, or flattened
    sig_before = torch.linalg.svdvals(deltas["base_model.model.fc1"])[:4]
    sig_after = torch.linalg.svdvals(want["base_model.model.fc1"])[:4]
    if name == "spectral":
        torch.testing.assert_close(
            sig_after, s * sig_before * torch.tensor([1, 1, 0.25, 0.25], dtype=torch.float64)
        )
    else:
        torch.testing.assert_close(
            sig_after, torch.full((4,), s * float(sig_before.mean()), dtype=torch.float64)
        )


def test_spectral_on_full_updates_reweights_matrices_and_scales_vectors():
    model, w0 = full_model()
    x = torch.randn(9, 10, dtype=torch.float64)
    deltas = dense_deltas(model)
    cfg = ObjectiveConfig(operators="spectral", keep_min=0.3, keep_max=0.3)
    gen = torch.Generator().manual_seed(2)
    d = OPERATORS.get("spectral").draw(cfg, model.units(), gen)
    # replay the draw's numbers: keep, tail, s
    gen = torch.Generator().manual_seed(2)
    keep = 0.3 + 0.0 * float(torch.rand(1, generator=gen, dtype=torch.float64))
    tail = float(torch.rand(1, generator=gen, dtype=torch.float64))
    s = 0.05 + 1.95 * float(torch.rand(1, generator=gen, dtype=torch.float64))
    assert d.s == pytest.approx(s)
    want = {
        n: _svd_reweighted(dl, truncate(keep, tail), s) if dl.dim() == 2 else s * dl
        for n, dl in deltas.items()
    }
    assert isinstance(d.transforms["fc1.bias"], Scale) and isinstance(d.transforms["fc1.weight"], Dense)
    with model.transformed(d.transforms):
        got = model.model(x)
    torch.testing.assert_close(got, reference_output(model, w0, x, want), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        reweight_dense(flatten, 1.0)(deltas["fc2.weight"]),
        _svd_reweighted(deltas["fc2.weight"], flatten, 1.0),
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_relative_distance_against_the_dense_computation(kind):
    model, _ = lora_model() if kind == "lora" else full_model()
    units = model.units()
    deltas = dense_deltas(model)
    total = sum(float(d.pow(2).sum()) for d in deltas.values())

    def dense_distance(new):
        return math.sqrt(sum(float((new[n] - deltas[n]).pow(2).sum()) for n in deltas) / total)

    assert relative_distance(units, Draw("scale", 0.7)) == pytest.approx(0.3)
    scales = {n: 0.5 + 0.2 * i for i, n in enumerate(deltas)}
    d = Draw("layer_scale", 1.0, {n: Scale(v) for n, v in scales.items()})
    assert relative_distance(units, d) == pytest.approx(
        dense_distance({n: scales[n] * x for n, x in deltas.items()})
    )
    d = Draw("trim", 0.9, {n: Dense(lambda x: 0.9 * trim(x, 0.4)) for n in deltas})
    assert relative_distance(units, d) == pytest.approx(
        dense_distance({n: 0.9 * trim(x, 0.4) for n, x in deltas.items()})
    )
    if kind == "lora":  # the factored form never builds out × in
        f = truncate(0.5, 0.1)
        d = Draw("spectral", 1.1, {n: Factors(reweight_lora(f, 1.1)) for n in deltas})
        want = dense_distance({n: _svd_reweighted(x, f, 1.1) for n, x in deltas.items()})
        assert relative_distance(units, d) == pytest.approx(want, rel=1e-9)


def test_draws_within_delta_of_the_update_are_rejected(monkeypatch):
    model, _ = lora_model()
    units = model.units()
    # trim at keep 1 is s·ΔW: with s over [0.9, 1.06] most draws fall inside δ = 0.05 and are redrawn
    cfg = ObjectiveConfig(operators="trim", keep_min=1.0, keep_max=1.0, s_min=0.9, s_max=1.06, delta=0.05)
    draws = draw_operators(cfg, model, 40, torch.Generator().manual_seed(0))
    assert all(relative_distance(units, d) >= 0.05 * (1 - 1e-9) for d in draws)
    assert {d.operator for d in draws} <= {"trim", "scale"}
    # an operator that never leaves the identity: every draw falls back to the paper's s·ΔW
    identity = OperatorSpec("identity", "", "", "", lambda cfg, units, gen: Draw("identity", 1.0, {}))
    monkeypatch.setitem(OPERATORS._items, "trim", identity)
    draws = draw_operators(ObjectiveConfig(operators="trim"), model, 3, torch.Generator().manual_seed(0))
    assert [d.operator for d in draws] == ["scale"] * 3
    assert all(d.transforms is None and abs(d.s - 1) >= 0.05 for d in draws)


def test_a_zero_update_is_not_rejected_forever():
    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))  # B = 0: ΔW = 0
    scaled = ScaledModel(model, "lora")
    cfg = ObjectiveConfig(operators="trim,spectral")
    draws = draw_operators(cfg, scaled, 4, torch.Generator().manual_seed(0))
    assert {d.operator for d in draws} <= {"trim", "spectral"} and len(draws) == 4


def test_the_default_family_draws_the_papers_scales():
    from trap2.objectives.trap2 import sample_scales

    model, _ = lora_model()
    cfg = ObjectiveConfig(n_samples=3)
    draws = draw_operators(cfg, model, 3, torch.Generator().manual_seed(4))
    assert [d.s for d in draws] == sample_scales(cfg, 3, torch.Generator().manual_seed(4))
    assert all(d.transforms is None and d.operator == "scale" for d in draws)


def _replay(seed, cfg, spectral):
    """The numbers a one-operator family's draw takes from its generator: the pick, keep, (tail), s."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(1, (1,), generator=gen)  # the pick among one operator
    u = lambda: float(torch.rand(1, generator=gen, dtype=torch.float64))  # noqa: E731
    keep = cfg.keep_min + (cfg.keep_max - cfg.keep_min) * u()
    tail = u() if spectral else None
    s = cfg.s_min + (cfg.s_max - cfg.s_min) * u()
    return keep, tail, s


def hand_operator(model, d, cfg, ops, seed):
    """{unit: op(ΔW)} for the draw ``d`` of the one-operator family ``ops`` (drawn from a generator seeded
    ``seed``), op written out by hand on each unit's dense ΔW, which keeps its graph."""
    keep, tail, s = _replay(seed, cfg, ops == "spectral") if ops != "layer_scale" else (None, None, d.s)
    assert d.s == pytest.approx(s)
    new = {}
    for u in model.units():
        delta = u.delta()
        if ops == "layer_scale":
            new[u.name] = d.transforms[u.name].s * delta
        elif ops == "trim":
            mask = (
                delta.detach().abs()
                >= delta.detach()
                .abs()
                .flatten()
                .sort(descending=True)
                .values[round(delta.numel() * keep) - 1]
            )
            new[u.name] = s * delta * mask
        elif delta.dim() == 1:
            new[u.name] = s * delta
        else:  # spectral: U, V constants, σ_i = u_iᵀ ΔW v_i carries the gradient
            uu, sig, vh = torch.linalg.svd(delta.detach(), full_matrices=False)
            sigma = ((uu.T @ delta) * vh).sum(1)
            rank = int((sig > sig[0] * max(delta.shape) * torch.finfo(torch.float32).eps).sum())
            n_keep = max(1, math.ceil(keep * rank))
            w = torch.tensor([1.0] * n_keep + [tail] * (sig.numel() - n_keep), dtype=torch.float64)
            new[u.name] = s * (uu * (sigma * w)) @ vh
    return new


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("ops", ["trim", "spectral", "layer_scale"])
def test_objective_gradient_at_an_operator_draw_equals_the_formula(kind, ops):
    """J = L(W0+ΔW) − λ·w(s)·L(W0 + op(ΔW)), op written out by hand on the dense ΔW, one graph."""
    model, w0 = lora_model(1) if kind == "lora" else full_model(1)
    x, y = torch.randn(12, 10, dtype=torch.float64), torch.randint(0, 7, (12,))
    cfg = ObjectiveConfig(lam=0.4, operators=ops, keep_min=0.3, keep_max=0.6)
    (d,) = draw_operators(cfg, model, 1, torch.Generator().manual_seed(8))
    st = get_objective(cfg).backward(model, x, y, F.cross_entropy, torch.Generator().manual_seed(8))
    assert st.scales == [d.s]
    params = [p for p in model.model.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # the reference: the model's own forward at s = 1, and W0 + op(ΔW) through functional_call
    new = hand_operator(model, d, cfg, ops, 8)
    off = F.cross_entropy(reference_output(model, w0, x, new), y)
    j = F.cross_entropy(model.model(x), y) - cfg.lam / d.s * off
    j.backward()
    assert st.loss == pytest.approx(float(j.detach()), rel=1e-10)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-10)
