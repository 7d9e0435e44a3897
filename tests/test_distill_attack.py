"""Distillation un-trapping (DisTaC-style): the student recovers its teacher's accuracy from unlabelled
inputs, its norm is the target norm exactly, and the registered ``distill`` search merges it and
reports the distillation ceiling."""

import pytest
import torch
from attack_checks import reevaluated
from threat_suite import threat_suite

from trap2.attacks import EvalContext, run_attack
from trap2.attacks.distill import delta_norm, distill_update, others_norm, rescaled
from trap2.attacks.finetune import AttackPoint
from trap2.attacks.searches.distill import default_point, distilled
from trap2.errors import ConfigError
from trap2.eval.evaluate import accuracy, base_state
from trap2.updates import LowRank, Update, apply_delta


@pytest.fixture(scope="module")
def tiny():
    suite, updates = threat_suite()
    backbone = suite.make_backbone()
    return suite, updates, backbone, base_state(backbone)


def test_student_recovers_the_teachers_accuracy_with_the_norm_matched_exactly(tiny):
    suite, updates, backbone, w0 = tiny
    task, release = suite.task("t0"), updates["t0"]

    def acc(delta):
        return accuracy(backbone, task, "test", apply_delta(w0, delta))

    teacher, zero_shot = acc(release.dense()), accuracy(backbone, task, "test")
    assert teacher == 1.0 and zero_shot < 0.5  # the labels are the teacher's: there is something to learn
    point = AttackPoint(1e-2, 300, 400, "lora", "adamw", 0)

    fresh = distill_update(backbone, w0, release, task, point, "w0", None)  # the ceiling: no norm adjustment
    assert all(isinstance(d, LowRank) and d.rank == 8 for d in fresh.deltas.values())  # a fresh LoRA
    assert acc(fresh.dense()) > 0.85

    norm = 0.5 * delta_norm(release.deltas)  # the release rescaled to half its norm loses accuracy …
    halved = acc(Update(rescaled(release.deltas, 0.5)).dense())
    student = distill_update(backbone, w0, release, task, point, "release", norm)
    assert delta_norm(student.deltas) == pytest.approx(norm, rel=1e-6)  # … the student keeps that norm
    assert acc(student.dense()) > halved + 0.03  # and distillation buys accuracy back at it
    assert student.meta["task"] == "t0" and student.meta["distilled"]["init"] == "release"
    assert student.meta["distilled"]["norm"] == norm


def test_full_student_from_the_release_and_the_norm_of_a_lora_branch(tiny):
    suite, updates, backbone, w0 = tiny
    release = updates["t1"]
    point = AttackPoint(1e-2, 0, 50, "full", "sgd", 0)  # no steps: the student is the rescaled release
    student = distill_update(backbone, w0, release, suite.task("t1"), point, "release", 2.0)
    for n, d in release.dense().items():
        torch.testing.assert_close(student.dense()[n], d * 2.0 / delta_norm(release.deltas))
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    assert delta_norm({"w": LowRank(a, b, 0.5)}) == pytest.approx(float((0.5 * b @ a).norm()), rel=1e-6)


def test_distill_search_merges_the_student_and_reports_the_ceiling(tiny):
    suite, updates, backbone, _ = tiny
    pool = [updates[t] for t in suite.task_names]
    ctx = EvalContext.normalised_by(suite, updates)
    rec = run_attack(ctx, pool, "ta", "full", "distill", protected_index=0)
    student = distilled(ctx, pool, 0, default_point(ctx, pool[0]))
    assert delta_norm(student.deltas) == pytest.approx(others_norm(pool, 0), rel=1e-6)
    assert others_norm(pool, 0) == pytest.approx(
        (delta_norm(pool[1].deltas) + delta_norm(pool[2].deltas)) / 2
    )
    assert rec["val_score"] == reevaluated(ctx, [student, *pool[1:]], rec)
    assert set(rec["ceiling"]) == {"t0"} and 0.0 <= rec["ceiling"]["t0"] <= 1.0
    assert rec["distill"]["samples"] == 100 and rec["distill"]["mode"] == "full"  # a dense release


def test_distill_refuses_bad_settings(tiny):
    suite, updates, backbone, w0 = tiny
    task, release = suite.task("t0"), updates["t0"]
    point = AttackPoint(1e-2, 1, 10)
    with pytest.raises(ConfigError, match="init"):
        distill_update(backbone, w0, release, task, point, "zero", None)
    with pytest.raises(ConfigError, match="norm"):
        distill_update(backbone, w0, release, task, point, "release", 0.0)
    with pytest.raises(ConfigError, match="not a parameter"):
        distill_update(backbone, w0, Update({"nope.weight": torch.zeros(2, 2)}), task, point)
    with pytest.raises(ConfigError, match="other member"):
        others_norm([release], 0)
    with pytest.raises(ConfigError, match="optimiser"):
        AttackPoint(1e-2, 1, 10, optimiser="lbfgs")


def test_attacks_leave_a_lora_release_untouched(tiny):
    """The student trains copies of the release's LoRA factors: the release (still in the pool the
    other cells merge) keeps its tensors bit for bit."""
    from trap2.attacks.untrap import untrap_at

    suite, updates, backbone, w0 = tiny
    gen = torch.Generator().manual_seed(3)
    release = Update(
        {
            "fc1.weight": LowRank(torch.randn(4, 6, generator=gen), torch.randn(16, 4, generator=gen), 0.5),
            "fc2.weight": LowRank(torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen), 0.5),
        },
        {"task": "t0"},
    )
    before = {n: (d.A.clone(), d.B.clone()) for n, d in release.deltas.items()}
    point = AttackPoint(1e-2, 20, 50, "lora", "adamw", 0)
    student = distill_update(backbone, w0, release, suite.task("t0"), point, "release", 1.0)
    untrapped = untrap_at(backbone, w0, release, suite.task("t0"), point)
    for n, d in release.deltas.items():
        assert torch.equal(d.A, before[n][0]) and torch.equal(d.B, before[n][1]), n
        assert isinstance(student.deltas[n], LowRank) and isinstance(untrapped.deltas[n], LowRank)
        assert not torch.equal(untrapped.deltas[n].A, d.A)  # the copies did train
