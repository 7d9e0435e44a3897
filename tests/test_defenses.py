"""PaRaMS and Merge-Lock: function-preserving on the full weights of tiny BERT / ViT / CLIP models and
the digits ViT (outputs equal to 1e-4), further from the base than the fine-tune was, refused on a
CNN, and, applied to an adapter's ΔW alone, breaking the update standalone."""

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from trap2.config import ObjectiveConfig, TrainConfig
from trap2.defenses import find_layers, merge_lock, params_defense
from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy, base_state
from trap2.training import train_update
from trap2.updates import apply_delta

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(
            BertConfig(vocab_size=50, max_position_embeddings=16, **SMALL), add_pooling_layer=False
        )
        x = {"input_ids": torch.randint(0, 50, (3, 10))}
    elif kind == "vit":
        model = ViTModel(ViTConfig(image_size=16, patch_size=8, **SMALL), add_pooling_layer=False)
        x = {"pixel_values": torch.randn(3, 3, 16, 16)}
    else:
        model = CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=8, **SMALL))
        x = {"pixel_values": torch.randn(3, 3, 16, 16)}
    return model.eval(), x


def fine_tuned(model):
    """W0 and a 'fine-tuned' W = W0 + a random perturbation of every weight."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }
    return base, state


@pytest.mark.parametrize("kind", ["bert", "vit", "clip"])
@pytest.mark.parametrize("defense", ["params", "merge_lock"])
def test_defenses_preserve_function_and_move_away_from_the_base(kind, defense):
    model, x = tiny(kind)
    base, state = fine_tuned(model)
    model.load_state_dict(state)
    with torch.no_grad():
        want = model(**x).last_hidden_state
    if defense == "params":
        locked = params_defense(state, base, n_heads=4, seed=3)
    else:
        locked = merge_lock(state, n_heads=4, seed=3)
    model.load_state_dict(locked)
    with torch.no_grad():
        got = model(**x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for layer in find_layers(state, 4):
        q = f"{layer.q}.weight"
        assert (locked[q] - state[q]).norm() > 0.2 * state[q].norm()  # the heads really are transformed
        if defense == "params":  # the assignment maximises the MLP units' distance to the base

            def units(w, layer=layer):
                return torch.cat([w[f"{layer.fc_in}.weight"], w[f"{layer.fc_out}.weight"].T], 1)

            assert (units(locked) - units(base)).norm() >= (units(state) - units(base)).norm()
            assert not torch.equal(units(locked), units(state))


def test_defenses_refuse_a_cnn():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
    with pytest.raises(ConfigError, match="a CNN has none"):
        merge_lock(conv.state_dict(), n_heads=2)
    with pytest.raises(ConfigError, match="a CNN has none"):
        params_defense(conv.state_dict(), conv.state_dict(), n_heads=2)


def test_baseline_update_refuses_an_unknown_defense(digits):
    from trap2.defenses import BASELINES, baseline_update
    from trap2.updates import Update

    assert BASELINES == ("params", "merge_lock")
    with pytest.raises(ConfigError, match="'nope' is not one of params, merge_lock"):
        baseline_update(digits, Update({}, {}), "nope", base_state(digits.make_backbone()))


@pytest.mark.slow  # 300 LoRA steps
def test_applied_to_the_adapter_alone_the_update_breaks(digits):
    update = train_update(
        digits, "rot90", TrainConfig(steps=300, eval_every=300, objective=ObjectiveConfig(name="none"))
    )
    backbone = digits.make_backbone()
    w0, delta = base_state(backbone), update.update.dense()
    task = digits.task("rot90")
    full = {k: w0[k] + delta.get(k, 0) for k in w0}
    standalone = accuracy(backbone, task, "test", apply_delta(w0, delta))
    gain = standalone - accuracy(backbone, task, "test")  # what fine-tuning added over W0
    params = lambda s, apply_to=None: params_defense(s, w0, n_heads=4, apply_to=apply_to)  # noqa: E731
    lock = lambda s, apply_to=None: merge_lock(s, n_heads=4, apply_to=apply_to)  # noqa: E731
    # measured (rot90, 300 LoRA steps): standalone 95.3, zero-shot 54.7; adapter alone: PaRaMS 86.9,
    # Merge-Lock 66.7
    for defend, min_loss in ((params, 0.1), (lock, 0.5)):
        # on the full weights the released model still works ...
        assert accuracy(backbone, task, "test", defend(full)) == pytest.approx(standalone, abs=0.01)
        # ... but a publisher who reparameterises only the adapter's ΔW ships a broken update
        broken = accuracy(backbone, task, "test", apply_delta(w0, defend(full, apply_to=delta)))
        assert standalone - broken > min_loss * gain, (standalone, broken)


@pytest.mark.slow  # a whole demo: 9 trainings and the attacks
def test_demo_attacks_the_baselines_like_trap2(tmp_path, digits):
    from trap2.defenses import baseline_update
    from trap2.demo import run_demo
    from trap2.pipeline import DemoConfig
    from trap2.updates import load_update

    cfg = DemoConfig(
        train=TrainConfig(steps=20, eval_every=20),
        methods=("ta", "ties"),
        spaces=("full",),
        extra_searches=("pinned",),
        baselines=("params", "merge_lock"),
        baseline_searches=("global",),
        scales=(0.5, 1.0, 2.0),
    )
    report = run_demo(cfg, tmp_path)
    cells = {(a["method"], a["search"]) for a in report["attacks"]}
    assert cells == {("ta", "global"), ("ties", "global"), ("ta", "pinned")}
    assert {(b["defense"], b["method"], b["search"]) for b in report["baselines"]} == {
        (d, m, s) for d in ("params", "merge_lock") for m, s in cells if s == "global"
    }
    with pytest.raises(ConfigError, match="baseline_searches: 'untrap'"):
        dataclasses.replace(cfg, baseline_searches=("global", "untrap"))
    md = (tmp_path / "report.md").read_text()
    assert "Stronger threats" in md and "| PaRaMS | Merge-Lock |" in md
    # the released baseline works standalone exactly as the plain update it hides
    plain = load_update(next(p for p in (tmp_path / "updates").iterdir() if "rot90-lora-none" in p.name))
    backbone = digits.make_backbone()
    w0 = base_state(backbone)
    for d in ("params", "merge_lock"):
        locked = baseline_update(digits, plain, d, w0)
        want = accuracy(backbone, digits.task("rot90"), "test", apply_delta(w0, plain.dense()))
        assert accuracy(
            backbone, digits.task("rot90"), "test", apply_delta(w0, locked.dense())
        ) == pytest.approx(want, abs=0.01)
