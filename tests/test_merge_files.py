"""``trap2 merge`` end to end on a tiny GPT-2 (Conv1D layers, ``fan_in_fan_out``): the written adapter
loads in stock PEFT and computes W0 + merged ΔW."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import GPT2Config, GPT2Model

from trap2.errors import ConfigError
from trap2.io import save_tensors
from trap2.merge_job import merge_files
from trap2.updates import ADAPTER_WEIGHTS, Update, load_update

N_EMBD = 16


def _gpt2():
    torch.manual_seed(0)  # every call builds the same W0
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=N_EMBD, n_layer=2, n_head=2)
    return GPT2Model(cfg).eval()


@pytest.fixture(scope="module")
def gpt2_pool(tmp_path_factory):
    """A base checkpoint and three random LoRA adapters (c_attn: 16 -> 48, c_proj, c_fc: 16 -> 64)."""
    root = tmp_path_factory.mktemp("gpt2")
    save_tensors(root / "base.safetensors", {k: v.contiguous() for k, v in _gpt2().state_dict().items()})
    paths = []
    for i in range(3):
        torch.manual_seed(10 + i)
        cfg = LoraConfig(
            r=2 + i, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but ... Conv1D"
            model = get_peft_model(_gpt2(), cfg)
        Update.from_peft_model(model).save(root / f"a{i}", peft_model=model)
        paths.append(root / f"a{i}")
    return root, paths


def _with_delta(delta):
    model = _gpt2()
    state = model.state_dict()
    model.load_state_dict({**state, **{k: state[k] + d for k, d in delta.items()}})
    return model


@pytest.mark.parametrize("method", ["ta", "ties"])
@pytest.mark.parametrize("space", ["knots", "core"])
def test_merged_gpt2_adapter_loads_in_stock_peft(gpt2_pool, tmp_path, space, method):
    root, paths = gpt2_pool
    r = merge_files(paths, root / "base.safetensors", method, space, tmp_path / "m")
    assert r.update.kind == "lora"
    delta = load_update(tmp_path / "m").dense()
    if method == "ta":  # TA is the sum in every space: an independent reference for the written file
        total = [load_update(p).dense() for p in paths]
        for k, d in delta.items():
            torch.testing.assert_close(d, sum(t[k] for t in total), rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "m" / ADAPTER_WEIGHTS), "pt") as f:  # PEFT's layout: A (r, in)
        a = f.get_tensor("base_model.model.h.0.attn.c_attn.lora_A.weight")
        b = f.get_tensor("base_model.model.h.0.attn.c_attn.lora_B.weight")
    assert a.shape[1] == N_EMBD and b.shape[0] == 3 * N_EMBD
    loaded = PeftModel.from_pretrained(_gpt2(), tmp_path / "m").eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(input_ids=ids).last_hidden_state
        want = _with_delta(delta)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["out_is_an_input", "out_is_a_file", "search_needs_its_suite"])
def test_merge_refuses_an_unwritable_request_before_merging(gpt2_pool, tmp_path, monkeypatch, case):
    import trap2.merge_job

    root, paths = gpt2_pool

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge ran before the request was checked")

    monkeypatch.setattr(trap2.merge_job, "merge_updates", no_merge)
    (tmp_path / "file").write_text("x")
    out = {"out_is_an_input": paths[0], "out_is_a_file": tmp_path / "file"}.get(case, tmp_path / "m")
    search = "digits" if case == "search_needs_its_suite" else None
    before = (paths[0] / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(ConfigError, match="--out|--search"):
        merge_files(paths, root / "base.safetensors", "ta", "full", out, search_suite=search)
    assert (paths[0] / ADAPTER_WEIGHTS).read_bytes() == before and (tmp_path / "file").read_text() == "x"
