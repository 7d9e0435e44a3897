"""Iso-C and Iso-CTS against hand-built cases whose answer is known."""

import pytest
import torch

from trap2.merging import get_merge_method, merge_updates
from trap2.merging.iso import split_rank
from trap2.updates import Update


def _orthogonal_tasks(m=16, n=12, ranks=(2, 1, 3, 2), seed=0):
    """Deltas τ_t = U_t·diag(s_t)·V_tᵀ whose U_t (and V_t) are blocks of one orthonormal basis, so the
    SVD of Σ τ_t is the union of the tasks' own triplets."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    deltas, start, spectra = [], 0, []
    for r in ranks:
        s = 1 + 4 * torch.rand(r, generator=g, dtype=torch.float64)
        deltas.append(u[:, start : start + r] @ torch.diag(s) @ v[:, start : start + r].T)
        spectra.append(s)
        start += r
    basis = (u[:, :start], v[:, :start])
    return deltas, torch.cat(spectra), basis


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_iso_c_on_orthogonal_deltas_is_the_flattened_spectrum(alpha):
    deltas, s, (u, v) = _orthogonal_tasks()
    got = get_merge_method("iso_c")(deltas, alpha=alpha)
    torch.testing.assert_close(got, alpha * s.mean() * u @ v.T)  # every direction at the mean σ̄


def test_iso_c_flattens_the_spectrum_of_any_sum():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(10, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    total = sum(deltas)
    got = get_merge_method("iso_c")(deltas)
    sv = torch.linalg.svdvals(got)
    torch.testing.assert_close(sv, torch.full_like(sv, float(torch.linalg.svdvals(total).mean())))
    # the same singular vectors as the sum: got = σ̄·U·Vᵀ, so gotᵀ·total is symmetric positive definite
    cross = got.T @ total
    torch.testing.assert_close(cross, cross.T)
    assert bool((torch.linalg.eigvalsh(cross) > 0).all())


@pytest.mark.parametrize("common", [0.25, 0.5, 0.8])
def test_iso_cts_on_orthogonal_deltas_equals_iso_c(common):
    """Orthogonal tasks: the common subspace holds the largest directions of the sum, every other
    direction is the residual of exactly one task, so Iso-CTS spans what Iso-C spans, at the same σ̄."""
    deltas, _s, _ = _orthogonal_tasks(m=24, n=20)
    torch.testing.assert_close(
        get_merge_method("iso_cts")(deltas, common=common), get_merge_method("iso_c")(deltas)
    )


def test_iso_cts_adds_each_tasks_own_directions_with_a_flat_spectrum():
    g = torch.Generator().manual_seed(2)
    # one strong shared direction plus weak task-specific ones: Iso-C keeps the sum's rank, Iso-CTS
    # replaces the sum's weak tail by each task's own top directions off the common subspace
    shared = torch.randn(20, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 16, generator=g, dtype=torch.float64
    )
    deltas = [10 * shared + torch.randn(20, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    got = get_merge_method("iso_cts")(deltas, common=0.5)
    k_common, per = split_rank(16, 0.5, 4)
    assert (k_common, per) == (8, 2)
    sv = torch.linalg.svdvals(got)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv.mean())))  # orthonormal U, V: flat
    # each task's top direction off the common subspace lies in the merge's column space
    u_c = torch.linalg.svd(sum(deltas))[0][:, :k_common]
    col = torch.linalg.svd(got)[0]
    for d in deltas:
        top = torch.linalg.svd(d - u_c @ u_c.T @ d)[0][:, :1]
        assert float((col.T @ top).norm()) == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(got, get_merge_method("iso_c")(deltas))


@pytest.mark.parametrize(
    ("k", "common", "tasks", "want"),
    [(768, 0.8, 8, (616, 19)), (10, 0.8, 4, (10, 0)), (16, 0.5, 4, (8, 2)), (3, 0.0, 4, (3, 0))],
)
def test_split_rank(k, common, tasks, want):
    k_common, per = split_rank(k, common, tasks)
    assert (k_common, per) == want and k_common + per * tasks == k and k_common >= 0


def test_iso_of_lora_updates_does_not_lift_noise_directions():
    """A sum of rank-2 LoRA updates has rank ≤ 8: the flattened merge keeps that rank."""
    g = torch.Generator().manual_seed(3)
    ups = [Update({"w": torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)}) for _ in range(4)]
    for name in ("iso_c", "iso_cts"):
        got = merge_updates(ups, name).dense()["w"]
        assert int(torch.linalg.matrix_rank(got)) == 8, name
