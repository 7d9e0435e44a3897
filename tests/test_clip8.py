"""The clip8 suite from local paths, end to end on a tiny random CLIP and ImageFolder fixtures: data
prepared once, zero-shot heads from the text tower (frozen, outside the update), LoRA and full training
of the vision tower, and the demo's protect → merge → evaluate path."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import image_folders, tiny_clip

from trap2.config import LoraSettings, ObjectiveConfig, TrainConfig
from trap2.demo import run_demo
from trap2.errors import DataError
from trap2.eval.evaluate import accuracy, base_state
from trap2.pipeline import DemoConfig
from trap2.suites import _BUILT, clip8
from trap2.training.loop import train_update
from trap2.updates import apply_delta

DATASETS = ("mnist", "eurosat")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip8")
    model = tiny_clip(root / "clip")
    data = image_folders(root / "images", DATASETS)
    cache = root / "cache"
    clip8.prepare(data, cache, model)
    return model, data, cache


@pytest.fixture(scope="module")
def suite(paths):
    model, _, cache = paths
    return clip8.build_suite(cache, model)


def test_prepared_splits_follow_the_folders(suite):
    assert sorted(suite.task_names) == sorted(DATASETS)
    t = suite.task("mnist")
    assert t.n_classes == 3 and t.train.x.shape[1:] == (3, 32, 32)
    assert (len(t.train), len(t.val), len(t.test)) == (15, 3, 9)  # val carved from the 18 train images
    # class 0 is blue (sorted folder names), whose images are blue-dominated after normalisation
    blue = t.test.x[t.test.y == 0]
    assert bool((blue[:, 2].mean((1, 2)) > blue[:, 0].mean((1, 2))).all())


def test_heads_are_clip_zero_shot_classifiers(suite, paths):
    from transformers import AutoTokenizer, CLIPModel

    model, _, _ = paths
    clip, tok = CLIPModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    with torch.no_grad():
        prompts = [t.format("green circle") for t in clip8.TEMPLATES]
        out = clip.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        emb = F.normalize(getattr(out, "pooler_output", out), dim=-1)  # transformers 5 returns an output
    torch.testing.assert_close(suite.task("mnist").head.prototypes[1], F.normalize(emb.mean(0), dim=-1))
    assert suite.task("mnist").head.logit_scale == pytest.approx(float(clip.logit_scale.exp()))
    assert not list(suite.task("mnist").head.parameters())
    with torch.no_grad():  # the backbone is CLIP's image tower: its embedding equals get_image_features
        x = suite.task("mnist").test.x[:2]
        want = clip.get_image_features(pixel_values=x)
        torch.testing.assert_close(suite.make_backbone()(x), getattr(want, "pooler_output", want))


def test_lora_and_full_training_touch_only_the_vision_tower(suite):
    obj = ObjectiveConfig(name="trap2", lam=0.1)
    lora = train_update(suite, "mnist", TrainConfig(steps=2, batch_size=4, eval_every=2, objective=obj))
    layers = {n.split(".")[-2] for n in lora.update.deltas}
    assert layers == set(clip8.LORA_TARGETS) and all(
        n.startswith("vision_model.") for n in lora.update.deltas
    )
    full = train_update(
        suite, "mnist", TrainConfig(mode="full", steps=2, batch_size=4, eval_every=2, lr=1e-4, objective=obj)
    )
    assert "visual_projection.weight" in full.update.dense() and not any(
        "head" in n for n in full.update.dense()
    )


def test_demo_protects_merges_and_evaluates(paths, tmp_path, monkeypatch):
    model, _, cache = paths
    monkeypatch.setenv("TRAP2_CLIP_MODEL", str(model))  # get_suite("clip8") builds from the local paths
    monkeypatch.setenv("TRAP2_DATA", str(cache))
    monkeypatch.delitem(_BUILT, "clip8", raising=False)
    cfg = DemoConfig(
        suite="clip8",
        target="mnist",
        train=TrainConfig(steps=4, batch_size=4, eval_every=4, lora=LoraSettings(r=2, alpha=2)),
        methods=("ta", "ties"),
        spaces=("full",),
        extra_searches=(),
        scales=(0.5, 1.0, 2.0),
    )
    report = run_demo(cfg, tmp_path)
    suite = _BUILT.pop("clip8")
    assert {(a["method"], a["protected"]) for a in report["attacks"]} == {
        (m, p) for m in ("ta", "ties") for p in (False, True)
    }
    from trap2.updates import load_update

    prot = next(p for p in (tmp_path / "updates").iterdir() if "-trap2-" in p.name)
    backbone = suite.make_backbone()
    want = accuracy(
        backbone, suite.task("mnist"), "test", apply_delta(base_state(backbone), load_update(prot).dense())
    )
    assert report["standalone"]["protected"]["mnist"] == pytest.approx(want)
    assert all(0.0 <= a["acc"]["mean"] <= 1.0 for a in report["attacks"])


def test_missing_paths_and_bad_images_are_clear_errors(tmp_path, monkeypatch, paths):
    monkeypatch.delenv("TRAP2_CLIP_MODEL", raising=False)
    with pytest.raises(DataError, match="TRAP2_CLIP_MODEL"):
        clip8.model_path()
    with pytest.raises(DataError, match="no such folder"):
        clip8.prepare(tmp_path / "none", tmp_path, paths[0])
    data = image_folders(tmp_path / "img", ("dtd",), n=(2, 1))
    (data / "dtd" / "train" / "blue" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        clip8.prepare(data, tmp_path / "c", paths[0], datasets=("dtd",))
    with pytest.raises(DataError, match="not a saved CLIP model"):
        clip8.load_image_encoder(tmp_path)
