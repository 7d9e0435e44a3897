"""WUDI-Merging against cases whose answer is known: the loss's closed-form minimum, and tasks that do
not interfere at all."""

import pytest
import torch

from trap2.merging import get_merge_method, merge_deltas
from trap2.merging.wudi import wudi_loss


def _orthogonal_row_tasks(m=6, n=12, t=3, seed=0):
    """τ_i whose rows live in mutually orthogonal subspaces of R^n: τ_i·τ_jᵀ = 0 for i ≠ j."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]  # (n, n)
    block = n // t
    return [
        torch.randn(m, block, generator=g, dtype=torch.float64) @ basis[:, i * block : (i + 1) * block].T
        for i in range(t)
    ]


def test_orthogonal_row_tasks_do_not_interfere_and_stay_at_the_sum():
    deltas = _orthogonal_row_tasks()
    total = sum(deltas)
    assert float(wudi_loss(total, deltas)) < 1e-20  # Σ τ_i is already the minimum
    got = get_merge_method("wudi")(deltas, lr=1e-2, steps=200)
    # only rounding-level gradients (~1e-16·|τ|²) drive Adam here: the drift stays far below the
    # lr·steps = 2 an O(1) gradient would give (FusionBench's float32 autograd gradient is noisier)
    assert float((got - total).abs().max()) < 1e-3 * 1e-2 * 200
    assert float(wudi_loss(got, deltas)) < 1e-6


def test_adam_reaches_the_closed_form_minimum():
    """L is quadratic: ∇L = 2·(τ·G − R) = 0 at τ* = R·G⁻¹ (G = Σ τ_iᵀτ_i/‖τ_i‖², R = Σ τ_i·τ_iᵀτ_i/‖τ_i‖²)."""
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    gram = sum(d.T @ d / d.square().sum() for d in deltas)
    target = sum(d @ d.T @ d / d.square().sum() for d in deltas)
    best = torch.linalg.solve(gram, target.T).T  # G is symmetric
    start = sum(deltas)
    got = get_merge_method("wudi")(deltas, lr=1e-2, steps=3000)
    floor, initial = float(wudi_loss(best, deltas)), float(wudi_loss(start, deltas))
    assert float(wudi_loss(got, deltas)) - floor < 1e-4 * (initial - floor)
    torch.testing.assert_close(got, best, rtol=0, atol=1e-4)


def test_a_few_steps_move_from_the_sum_by_at_most_lr_each():
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(8, 6, generator=g) for _ in range(4)]
    start = sum(deltas)
    got = get_merge_method("wudi")(deltas, lr=1e-3, steps=10)
    moved = (got - start).abs().max()
    assert 0 < float(moved) <= 10 * 1e-3 * 1.01  # Adam's step is at most ~lr per entry
    assert float(wudi_loss(got.double(), [d.double() for d in deltas])) < float(
        wudi_loss(start.double(), [d.double() for d in deltas])
    )
    assert torch.equal(got, get_merge_method("wudi")(deltas, lr=1e-3, steps=10))  # deterministic
    torch.testing.assert_close(get_merge_method("wudi")(deltas, steps=0), start)


def test_vectors_are_averaged_and_conv_kernels_are_matrices():
    g = torch.Generator().manual_seed(3)
    ups = [{"b": torch.randn(5, generator=g), "k": torch.randn(4, 3, 2, 2, generator=g)} for _ in range(3)]
    out = merge_deltas("wudi", ups, lr=1e-3, steps=50)
    torch.testing.assert_close(out["b"], sum(u["b"] for u in ups) / 3)
    flat = get_merge_method("wudi")([u["k"].reshape(4, -1) for u in ups], lr=1e-3, steps=50)
    torch.testing.assert_close(out["k"], flat.reshape(4, 3, 2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_runs_on_cuda_and_returns_where_the_inputs_are():
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(64, 48, generator=g) for _ in range(4)]
    gpu = get_merge_method("wudi")(deltas, lr=1e-4, steps=100)
    cpu = get_merge_method("wudi")(deltas, lr=1e-4, steps=100, device="cpu")
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
