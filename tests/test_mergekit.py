"""mergekit as an independent reference and as a real attacker (optional extra trap2[mergekit])."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")

from trap2.attacks.mergekit_bridge import mergekit_merge  # noqa: E402
from trap2.merging import merge_deltas  # noqa: E402


def _job(seed=0, t=4):
    g = torch.Generator().manual_seed(seed)
    w0 = {"a.weight": torch.randn(20, 10, generator=g), "a.bias": torch.randn(20, generator=g)}
    deltas = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in w0.items()} for _ in range(t)]
    return w0, deltas


@pytest.mark.parametrize(
    "method, hp",
    [
        ("ta", {}),
        ("ties", {"k": 50.0}),
        ("ties", {"k": 20.0}),
        ("dare", {"p": 0.0}),
        ("dare_ties", {"p": 0.0, "k": 100.0}),
    ],
)
def test_equal_to_mergekit(method, hp):
    w0, deltas = _job()
    ours = merge_deltas(method, deltas, **hp)
    theirs = mergekit_merge(w0, deltas, method, **hp)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_dare_has_mergekits_drop_rate_and_rescale():
    w0 = {"w": torch.zeros(400, 500)}
    deltas = [{"w": torch.ones(400, 500)}]
    ours = merge_deltas("dare", deltas, p=0.3)["w"]
    theirs = mergekit_merge(w0, deltas, "dare", p=0.3)["w"]
    for out in (ours, theirs):
        assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    # DARE (the paper, and trap2) rescales survivors by 1/(1-p); mergekit restores the L1 norm instead,
    # i.e. divides by the fraction actually kept: the same in expectation, not entry for entry
    assert torch.allclose(ours[ours != 0], torch.tensor(1 / 0.7))
    kept = float((theirs != 0).float().mean())
    assert torch.allclose(theirs[theirs != 0], torch.tensor(1 / kept))
    assert float(theirs.abs().sum()) == pytest.approx(400 * 500, rel=1e-5)


@pytest.mark.slow
def test_mergekit_yaml_cli_on_a_local_model(tmp_path):
    """mergekit's own CLI, offline, on a tiny local Llama: the same result as trap2's TA.

    (mergekit 0.1.5's BERT architecture definition fails to plan, a tuple/list bug in its aliases,
    so the decoder model it is built for is used.)
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cli = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    w0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    deltas = []
    for i in range(2):
        torch.manual_seed(i + 1)
        d = {k: 0.05 * torch.randn_like(v) for k, v in w0.items() if v.is_floating_point()}
        m = LlamaForCausalLM(cfg)
        m.load_state_dict({k: w0[k] + d[k] for k in w0})
        m.save_pretrained(tmp_path / f"m{i}")
        deltas.append(d)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "dtype": "float32",
        "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 0.5}} for i in range(2)],
    }
    (tmp_path / "merge.yml").write_text(json.dumps(config))  # JSON is valid YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(
        [cli, str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(f))
    ours = merge_deltas("ta", [{k: 0.5 * v for k, v in d.items()} for d in deltas])
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for k, d in ours.items():
        if k in tied:
            continue
        torch.testing.assert_close(merged[k] - w0[k], d, rtol=1e-5, atol=1e-6)
