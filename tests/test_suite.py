import pytest
import torch

from trap2.errors import UnknownNameError
from trap2.eval import accuracy
from trap2.suites import SUITES, get_suite
from trap2.suites.digits import TASKS, load_backbone, load_digit_splits, pretrain_backbone


def test_digits_suite_shape(digits):
    assert digits.task_names == list(TASKS) and len(digits.tasks) == 8
    for t in digits.tasks.values():
        assert (len(t.train), len(t.val), len(t.test)) == (1077, 360, 360)
        assert t.train.x.shape[1:] == (8, 8) and t.train.y.max() < t.n_classes
        assert not any(p.requires_grad for p in t.head.parameters())
    with pytest.raises(UnknownNameError, match="valid: rot90, flip"):
        digits.task("rot45")
    with pytest.raises(
        UnknownNameError, match="valid: clip8, digits, lm, math, text-transformer, vision-cnn"
    ):
        get_suite("imagenet")
    assert "digits" in SUITES


def test_splits_are_fixed_and_disjoint():
    a, b = load_digit_splits(), load_digit_splits()
    for k in a:
        assert torch.equal(a[k][0], b[k][0])
    flat = {k: {tuple(x.flatten().tolist()) for x in v[0]} for k, v in a.items()}
    # digits has a few duplicate images; the splits share almost none
    assert len(flat["train"] & flat["test"]) <= 3


def test_shipped_backbone_matches_its_fingerprint_and_is_accurate(digits):
    import hashlib

    bb = load_backbone()
    digest = hashlib.sha256()
    for k, v in sorted(bb.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.numpy().tobytes())
    assert digest.hexdigest() == digits.fingerprint
    zero_shot = {n: accuracy(bb, t, "test") for n, t in digits.tasks.items()}
    assert zero_shot["parity"] > 0.9  # upright digits: pretrained features already separate them
    assert 0.3 < zero_shot["rot90"] < 0.8  # a transformed task that fine-tuning must fix


def test_pretraining_script_logic_runs_and_learns():
    _, acc = pretrain_backbone(steps=60, seed=0, batch_size=64)
    assert acc > 0.3  # 10 classes: chance is 0.1


def test_a_run_elsewhere_moves_a_copy_of_the_head_not_the_suites():
    from trap2.suites.base import CosineHead, CrossEntropy, Split, Task

    split = Split(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    task = Task("t", 2, split, split, split, CosineHead(torch.randn(2, 3), 10.0))
    assert task.head_on("cpu") is task.head and task.loss == CrossEntropy()
    moved = task.head_on("meta")  # any device other than the head's
    assert moved.prototypes.device.type == "meta" and task.head.prototypes.device.type == "cpu"
