import json
import pickle
import warnings

import pytest
import torch
from conftest import TinyNet
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from trap2.errors import UpdateFileError
from trap2.io import save_tensors
from trap2.updates import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, LowRank, Update, load_update


def _trained_lora(**kw):
    torch.manual_seed(0)
    cfg = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    cfg.update(kw)
    return get_peft_model(TinyNet(), LoraConfig(**cfg))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc1": 3.0}},
        {"lora_bias": True},
    ],
)
def test_peft_adapter_round_trip(tmp_path, kw):
    model = _trained_lora(**kw)
    if kw.get("lora_bias"):
        with torch.no_grad():
            model.base_model.model.fc1.lora_B["default"].bias.normal_()
    upd = Update.from_peft_model(model, meta={"protection": {"lam": 0.1}})
    upd.save(tmp_path / "a", peft_model=model)
    again = load_update(tmp_path / "a")
    assert again.meta["protection"] == {"lam": 0.1}
    assert set(again.dense()) == set(upd.dense())
    for k, v in upd.dense().items():
        torch.testing.assert_close(again.dense()[k], v)
    # stock PEFT loads it with no warning and computes the same function
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert not any("trap2" in k or k == "protection" for k in cfg)
    _assert_peft_loads_the_same(tmp_path / "a", model)
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as f:
        assert json.loads(f.metadata()["trap2"])["protection"] == {"lam": 0.1}
    assert json.loads((tmp_path / "a" / SIDECAR).read_text())["kind"] == "lora"


def _assert_peft_loads_the_same(folder, model):
    """Stock PEFT loads the folder onto a fresh base with no warning and computes the same function."""
    torch.manual_seed(1)
    base = TinyNet()
    _copy_base(base, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(base, folder)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x), model(x))


def _copy_base(base, peft_model):
    src = peft_model.get_base_model()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(base, name).weight.copy_(src.get_submodule(name).base_layer.weight)
            getattr(base, name).bias.copy_(src.get_submodule(name).base_layer.bias)
        base.norm.load_state_dict(src.norm.state_dict())


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc1": 3.0}}])
def test_writer_without_a_model_makes_an_adapter_peft_loads(tmp_path, kw):
    model = _trained_lora(**kw)
    upd = Update.from_peft_model(model)
    upd.save(tmp_path / "b")  # written by trap2 itself (as merges will), not by PEFT
    _assert_peft_loads_the_same(tmp_path / "b", model)
    for k, v in load_update(tmp_path / "b").dense().items():
        torch.testing.assert_close(v, upd.dense()[k])


def test_dense_round_trip_and_bare_file(tmp_path):
    deltas = {"fc1.weight": torch.randn(8, 6), "norm.bias": torch.randn(8)}
    Update(deltas, {"mode": "full"}).save(tmp_path / "d")
    again = load_update(tmp_path / "d")
    assert again.kind == "dense" and again.meta == {"mode": "full"}
    for k in deltas:
        assert torch.equal(again.dense()[k], deltas[k])
    save_tensors(tmp_path / "bare.safetensors", deltas)
    assert set(load_update(tmp_path / "bare.safetensors").dense()) == set(deltas)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(UpdateFileError, match="no such file"):
        load_update(tmp_path / "missing")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UpdateFileError, match="empty or truncated"):
        load_update(tmp_path / "empty.safetensors")
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"w": torch.randn(4, 4)})
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:40])
    with pytest.raises(UpdateFileError, match="cut.safetensors: not a readable safetensors"):
        load_update(tmp_path / "cut.safetensors")
    save_tensors(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(UpdateFileError, match="'w' contains NaN or Inf"):
        load_update(tmp_path / "nan.safetensors")
    save_tensors(tmp_path / "int.safetensors", {"w": torch.arange(3)})
    with pytest.raises(UpdateFileError, match="dtype"):
        load_update(tmp_path / "int.safetensors")


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickles_are_never_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps({"w": _Payload()})
    for name in ("evil.safetensors", "evil.bin", "evil.pt"):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UpdateFileError):
            load_update(tmp_path / name)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(blob)
    with pytest.raises(UpdateFileError, match="only safetensors"):
        load_update(folder)
    assert not (tmp_path / "PWNED").exists()


def test_dora_adapter_file_is_refused(tmp_path):
    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(UpdateFileError, match="DoRA"):
        load_update(folder)


def test_check_base_catches_mismatches():
    upd = Update({"fc1.weight": torch.zeros(8, 6)}, {"base_fingerprint": "aaaa"})
    base = {"fc1.weight": torch.zeros(8, 6)}
    upd.check_base(base, "aaaa")
    with pytest.raises(UpdateFileError, match="shape"):
        upd.check_base({"fc1.weight": torch.zeros(6, 8)})
    with pytest.raises(UpdateFileError, match="no counterpart"):
        upd.check_base({"fc2.weight": torch.zeros(8, 6)})
    with pytest.raises(UpdateFileError, match="made for base"):
        upd.check_base(base, "bbbb")


def test_failed_save_leaves_nothing(tmp_path):
    upd = Update({"w": torch.randn(3)})
    upd.save(tmp_path / "u")
    before = (tmp_path / "u" / "delta.safetensors").read_bytes()
    bad = Update({"w": "not a tensor"})  # type: ignore[dict-item]
    with pytest.raises(AttributeError):
        bad.save(tmp_path / "u")
    assert (tmp_path / "u" / "delta.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def _full_finetune(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (8, 6), "fc1.bias": (8,), "norm.weight": (8,), "fc2.weight": (5, 8)}
    return Update({k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()})


def test_knots_merge_of_full_finetunes_is_saved_dense_and_loads_back(tmp_path):
    from trap2.merging import merge_updates

    merged = merge_updates([_full_finetune(0), _full_finetune(1)], "ties", "knots", k=50.0)
    assert isinstance(merged.deltas["fc1.weight"], LowRank)  # matrices low-rank, biases and norms dense
    assert isinstance(merged.deltas["fc1.bias"], torch.Tensor) and merged.kind == "dense"
    merged.save(tmp_path / "m")
    again = load_update(tmp_path / "m")
    assert again.kind == "dense" and set(again.dense()) == set(merged.dense())
    for k, v in merged.dense().items():
        assert torch.equal(again.dense()[k], v)


def _lora_bias_adapter(seed):
    model = _trained_lora(lora_bias=True)  # the same base W0 for every seed
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("space", ["full", "knots"])
def test_merge_of_lora_bias_adapters_is_an_adapter_stock_peft_loads(tmp_path, space):
    from trap2.merging import merge_updates

    models = [_lora_bias_adapter(s) for s in (1, 2)]
    merged = merge_updates([Update.from_peft_model(m) for m in models], "ta", space)
    assert merged.kind == "lora"  # LoRA weights plus a bias per LoRA module: PEFT's lora_bias
    merged.save(tmp_path / "m")
    again = load_update(tmp_path / "m")
    for k, v in merged.dense().items():
        torch.testing.assert_close(again.dense()[k], v)
    # stock PEFT computes W0 + merged ΔW
    torch.manual_seed(1)
    base, want = TinyNet(), TinyNet()
    _copy_base(base, models[0])
    _copy_base(want, models[0])
    with torch.no_grad():
        for k, d in merged.dense().items():
            want.get_parameter(k).add_(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(base, tmp_path / "m")
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x), want(x))
