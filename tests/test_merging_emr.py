"""EMR-Merging: the kernel on a hand-computed case and its mask / sign / rescale properties; per-task
merges evaluated task by task (each task at its own parameters) in the attack plumbing."""

import pytest
import torch
from attack_checks import reevaluated

from trap2.attacks import EvalContext, run_attack
from trap2.attacks.context import TaskParams
from trap2.errors import ConfigError
from trap2.eval import accuracy
from trap2.merging import PerTaskMerge, TaskDeltas, get_merge_method, merge_deltas, merge_updates
from trap2.pipeline import DemoConfig
from trap2.updates import LowRank, Update, apply_delta


def test_hand_computed_case():
    t1 = torch.tensor([3.0, -1.0, 2.0, 0.0])
    t2 = torch.tensor([1.0, 2.0, -4.0, 5.0])
    # Σ = [4, 1, −2, 5]: γ = [+, +, −, +]; M_1 = [1, 0, 0, 0], M_2 = [1, 1, 1, 1]
    # τ_uni = γ·max|M_t·τ_t| = [3, 2, −4, 5]; λ_1 = 6/3, λ_2 = 12/14
    got = get_merge_method("emr")([t1, t2])
    torch.testing.assert_close(got[0], torch.tensor([6.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(got[1], 12 / 14 * torch.tensor([3.0, 2.0, -4.0, 5.0]))


def test_model_scope_rescales_once_over_the_whole_update():
    ups = [
        {"w": torch.tensor([3.0, -1.0, 2.0, 0.0]), "v": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([1.0, 2.0, -4.0, 5.0]), "v": torch.tensor([-3.0, 1.0])},
    ]
    # w: τ_uni = [3, 2, −4, 5], M_1 = [1, 0, 0, 0], M_2 = 1; v: γ = [−, +], τ_uni = [−3, 1], M_1 = [0, 1]
    # λ_t = Σ_tensors mean|τ_t| / Σ_tensors mean|M_t ⊙ τ_uni|: λ_1 = (1.5 + 1)/(0.75 + 0.5) = 2,
    # λ_2 = (3 + 2)/(3.5 + 2) = 10/11 (per tensor it would be 6/7 for w and 1 for v)
    got = merge_deltas("emr", ups, scope="model")
    torch.testing.assert_close(got[0]["w"], torch.tensor([6.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(got[0]["v"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(got[1]["w"], 10 / 11 * torch.tensor([3.0, 2.0, -4.0, 5.0]))
    torch.testing.assert_close(got[1]["v"], 10 / 11 * torch.tensor([-3.0, 1.0]))
    per_tensor = merge_deltas("emr", ups)
    torch.testing.assert_close(per_tensor[1]["w"], 6 / 7 * torch.tensor([3.0, 2.0, -4.0, 5.0]))
    with pytest.raises(ConfigError, match="full space only"):
        merge_updates([Update({"w": torch.randn(3, 2)}) for _ in range(2)], "emr", "knots", scope="model")


def test_each_task_keeps_its_signs_and_its_l1_norm():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(9, 7, generator=g) for _ in range(5)]
    got = get_merge_method("emr")(deltas)  # (T, 9, 7)
    sign = torch.sign(sum(deltas))
    unified = sign * torch.stack([d.abs() * (d * sign > 0) for d in deltas]).amax(0)  # τ_uni by hand
    for d, r in zip(deltas, got, strict=True):
        kept = r != 0
        assert torch.equal(kept, d * sign > 0)  # the mask: entries whose sign agrees with the election
        assert bool((torch.sign(r[kept]) == torch.sign(d[kept])).all())
        torch.testing.assert_close(r.abs().sum(), d.abs().sum())  # the rescaler restores Σ|τ_t|
        ratio = r[kept] / unified[kept]  # τ̂_t = λ_t·M_t ⊙ τ_uni: one scalar λ_t per task
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))


def test_per_task_merge_of_updates_is_one_update_per_member():
    g = torch.Generator().manual_seed(1)
    ups = [
        Update(
            {"w": LowRank(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0)}, {"task": t}
        )
        for t in ("a", "b", "c")
    ]
    out = merge_updates(ups, "emr", "knots")
    assert isinstance(out, PerTaskMerge) and out.tasks == ("a", "b", "c")
    assert all(isinstance(u.deltas["w"], LowRank) for u in out.updates)  # the shared KnOTS basis
    dense = merge_deltas("emr", [u.dense() for u in ups])
    assert isinstance(dense, TaskDeltas) and len(dense) == 3 and dense.tasks == [None] * 3
    weighted = merge_updates(ups, "emr", weights=[2.0, 0.0, 1.0]).dense()
    assert float(weighted[1]["w"].abs().sum()) == 0.0  # a member at weight 0 has nothing left


@pytest.fixture(scope="module")
def ctx(digits):
    tasks = digits.task_names[:3]  # three tasks keep the searches quick
    return EvalContext(digits, {t: 1.0 for t in tasks}, tasks)


def _random_pool(ctx, scale=0.05, seed=0):
    """One random update per task on every 2-D weight (no training: the plumbing is what is tested)."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, p in ctx.w0.items() if p.dim() == 2]
    return [
        Update({n: scale * torch.randn(ctx.w0[n].shape, generator=g) for n in names}, {"task": t})
        for t in ctx.tasks
    ]


def test_each_task_is_evaluated_at_its_own_parameters(ctx, digits):
    pool = _random_pool(ctx)
    merged = merge_updates(pool, "emr").dense()
    params = ctx.params(merged, 0.7)
    assert isinstance(params, TaskParams) and set(params) == set(ctx.tasks)
    accs = ctx.accuracies(params, "val")
    for t, d in zip(ctx.tasks, merged, strict=True):
        assert accs[t] == accuracy(ctx.backbone, digits.task(t), "val", apply_delta(ctx.w0, d, 0.7))
    # shared parameters through the per-task path give the batched evaluation's accuracies
    shared = apply_delta(ctx.w0, pool[0].dense(), 0.3)
    assert ctx.accuracies(TaskParams({t: shared for t in ctx.tasks}), "val") == ctx.accuracies(shared, "val")
    with pytest.raises(ConfigError, match="no merged parameters for task"):
        ctx.accuracies(TaskParams({ctx.tasks[0]: shared}), "val")


def test_emr_runs_in_the_attack_matrix_and_refuses_one_model_searches(ctx):
    pool = _random_pool(ctx, seed=1)
    rec = run_attack(ctx, pool, "emr", "full", "global")
    assert rec["val_score"] == pytest.approx(reevaluated(ctx, pool, rec))
    rec = run_attack(ctx, pool, "emr", "full", "per_task")
    assert rec["val_score"] == pytest.approx(reevaluated(ctx, pool, rec))
    for search in ("restore", "recover10"):
        with pytest.raises(ConfigError, match="one merged model; emr gives one per task"):
            run_attack(ctx, pool, "emr", "full", search, protected_index=0)


def test_demo_cells_leave_out_one_model_searches_for_emr():
    cfg = DemoConfig(methods=("ties", "emr"), spaces=("full",), extra_searches=("restore", "untrap"))
    cells = cfg.cells()
    assert ("emr", "full", "untrap") in cells and ("ties", "full", "restore") in cells
    assert ("emr", "full", "restore") not in cells


def test_merge_files_refuses_a_per_task_method(tmp_path):
    from trap2.merge_job import merge_files

    paths = [
        Update({"blocks.0.fc1.weight": torch.randn(128, 64)}, {"task": t}).save(tmp_path / t)
        for t in ("flip", "invert")
    ]
    with pytest.raises(ConfigError, match="one merged model per task"):
        merge_files(paths, "digits", "emr", "full", tmp_path / "out")
    assert not (tmp_path / "out").exists()
