import pytest
import torch
from conftest import TinyNet
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from trap2.errors import ConfigError
from trap2.scaling import ScaledModel, base_params, lora_scale
from trap2.updates import Update, apply_delta

LORA_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3}),
}


def _lora_net(variant, seed=0):
    torch.manual_seed(seed)
    base = TinyNet()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(
        base, LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False, **LORA_VARIANTS[variant])
    )
    return model, w0


def _by_hand(model, w0, variant):
    """ΔW from the raw factors and the config's own numbers (not PEFT's scaling dict)."""
    kw = LORA_VARIANTS[variant]
    out = {}
    for name in ("fc1", "fc2"):
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        r = kw.get("rank_pattern", {}).get(name, kw["r"])
        alpha = kw.get("alpha_pattern", {}).get(name, kw["lora_alpha"])
        scale = alpha / r**0.5 if kw.get("use_rslora") else alpha / r
        assert a.shape[0] == r
        out[f"{name}.weight"] = (b @ a * scale).detach()
    return out


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
@pytest.mark.parametrize("s", [0.0, 0.3, 1.0, 1.7])
def test_lora_scale_is_w0_plus_s_delta(variant, s):
    model, w0 = _lora_net(variant)
    x = torch.randn(10, 6)
    delta = _by_hand(model, w0, variant)
    expected = functional_call(TinyNet(), {**w0, **apply_delta(w0, delta, s)}, (x,))
    with lora_scale(model, s):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the update read back from the live model agrees
    for k, d in Update.from_peft_model(model).dense().items():
        torch.testing.assert_close(d, delta[k], rtol=1e-6, atol=1e-7)


def test_lora_scale_restores_and_gradients_carry_s():
    model, _ = _lora_net("patterns")
    before = {id(m): dict(m.scaling) for m in model.modules() if hasattr(m, "scaling")}
    x = torch.randn(4, 6)
    with lora_scale(model, 0.5):
        model(x).sum().backward()
    g_half = model.base_model.model.fc2.lora_B["default"].weight.grad.clone()
    after = {id(m): dict(m.scaling) for m in model.modules() if hasattr(m, "scaling")}
    assert before == after
    with pytest.raises(RuntimeError), lora_scale(model, 3.0):
        raise RuntimeError("boom")
    assert before == {id(m): dict(m.scaling) for m in model.modules() if hasattr(m, "scaling")}
    assert g_half.abs().sum() > 0


def test_dora_and_modules_to_save_are_refused():
    torch.manual_seed(0)
    dora = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        ScaledModel(dora, "lora")
    mts = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], modules_to_save=["fc2"]))
    with pytest.raises(ConfigError, match="modules_to_save"):
        ScaledModel(mts, "lora")


def test_full_scaling_touches_every_trainable_parameter(tiny_net):
    w0 = base_params(tiny_net)
    assert set(w0) == {n for n, _ in tiny_net.named_parameters()}  # weights, biases and norms
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    scaled = ScaledModel(tiny_net, "full", w0)
    x = torch.randn(6, 6)
    s = 0.4
    hand = {n: w0[n] + s * (p.detach() - w0[n]) for n, p in tiny_net.named_parameters()}
    torch.testing.assert_close(scaled(x, s), functional_call(TinyNet(), hand, (x,)))
    scaled(x, s).pow(2).sum().backward()
    for n, p in tiny_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # the model's own parameters were not modified, and W0 is one copy, not one per call
    assert all(not torch.equal(p.detach(), w0[n]) for n, p in tiny_net.named_parameters())
    assert scaled.w0 is not None and len(scaled.w0) == len(w0)


def test_full_scaler_tied_weights_and_cleanup():
    """A parameter shared by two modules keeps one W0 and is scaled in both; a forward that raises
    leaves no scaled weight behind; outside the block the module computes with W again."""
    from torch import nn

    from trap2.scaling import FullScaler

    torch.manual_seed(0)
    emb = nn.Embedding(7, 4)
    out = nn.Linear(4, 7, bias=False)
    out.weight = emb.weight  # tied, as in language models
    model = nn.Sequential(emb, out)
    w0 = base_params(model)
    assert list(w0) == ["0.weight"]
    with torch.no_grad():
        emb.weight.add_(0.5)
    ids = torch.tensor([[1, 2, 3]])
    scaler = FullScaler(model, w0)
    with scaler.scale(0.25):
        got = model(ids)
    w = w0["0.weight"] + 0.25 * (emb.weight.detach() - w0["0.weight"])
    torch.testing.assert_close(got, torch.nn.functional.embedding(ids, w) @ w.T)

    with pytest.raises(IndexError), scaler.scale(3.0):
        model(torch.tensor([[99]]))
    assert "weight" not in emb.__dict__ and "weight" not in out.__dict__
    torch.testing.assert_close(model(ids), out(emb(ids)))
    with pytest.raises(ConfigError, match="shape"):
        FullScaler(model, {"0.weight": torch.zeros(2, 2)})
