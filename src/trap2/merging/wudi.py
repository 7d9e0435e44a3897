"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025): a task's inputs to a linear layer lie close to the span of the
rows of its own task vector, so the interference of a merge on task i is measured by (τ − τ_i)·τ_iᵀ.
Per matrix, from τ = Σ_i τ_i, a fixed number of Adam steps on

    L(τ) = Σ_i ‖(τ − τ_i)·τ_iᵀ‖²_F / ‖τ_i‖²_F.

The gradient is 2·(τ·G − R) with G = Σ_i τ_iᵀτ_i/‖τ_i‖² (n, n) and R = Σ_i τ_i·τ_iᵀτ_i/‖τ_i‖² (m, n),
both formed once (float64), so a step costs one (m, n)·(n, n) product whatever the number of tasks. Adam
(β = 0.9, 0.999, ε = 1e-8, the public code's lr 1e-5 and 300 steps) runs in float32 on the step away
from τ_0, on ``device`` ('auto': CUDA when available, else where the inputs are); it is deterministic on
one device. The public code minimises the same loss by autograd on τ, in float32. Non-matrix tensors are averaged; conv kernels
are (out, in·kh·kw) matrices. One member is a minimum already (zero gradient): it comes back as it is.
"""

from __future__ import annotations

import torch

from trap2.merging.registry import HParam, merge_method


def _device(device: str, like: torch.Tensor) -> torch.device:
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else like.device
    return torch.device(device)


def wudi_loss(merged: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i ‖(τ − τ_i)·τ_iᵀ‖²_F / ‖τ_i‖²_F (for tests and diagnostics)."""
    return sum(((merged - m) @ m.T).square().sum() / m.square().sum() for m in mats)


@merge_method(
    "wudi",
    summary="per matrix, Adam steps from Σ τ_i on Σ_i ‖(τ − τ_i)·τ_iᵀ‖² / ‖τ_i‖² (data-free)",
    reference="Cheng et al., ICML 2025, arXiv:2503.08099",
    hparams={
        "lr": HParam(
            1e-5,
            "Adam learning rate (absolute: the public code's 1e-5 suits CLIP-size deltas)",
            lambda v: isinstance(v, (int, float)) and v > 0,
            "a number > 0",
            grid=(1e-6, 1e-5, 1e-4, 1e-3),
        ),
        "steps": HParam(
            300,
            "Adam steps per matrix",
            lambda v: isinstance(v, int) and v >= 0,
            "an integer >= 0",
            grid=(100, 300, 1000),
        ),
        "device": HParam(
            "auto",
            "where the steps run: 'auto' (CUDA when available), 'cpu', 'cuda', …",
            lambda v: isinstance(v, str) and bool(v),
            "a device name",
        ),
    },
)
def wudi(deltas: list[torch.Tensor], lr: float, steps: int, device: str) -> torch.Tensor:
    if deltas[0].dim() < 2:
        return torch.stack([d.to(torch.float64) for d in deltas]).mean(0).to(deltas[0].dtype)
    shape, dtype = deltas[0].shape, deltas[0].dtype
    dev = _device(device, deltas[0])
    mats = [d.reshape(shape[0], -1).to(dev, torch.float64) for d in deltas]  # (m, n') each
    gram = torch.zeros(mats[0].shape[1], mats[0].shape[1], dtype=torch.float64, device=dev)
    target = torch.zeros_like(mats[0])
    for m in mats:
        norm = m.square().sum()
        if norm == 0:  # a zero member interferes with nothing
            continue
        g = m.T @ m / norm  # (n', n')
        gram += g
        target += m @ g
    start = sum(mats)  # τ_0 = Σ τ_i
    # Adam on the step x = τ − τ_0 (Adam is translation-invariant): ∇ = 2·(x·G + (τ_0·G − R)), the
    # constant part in float64, so a minimum (one member) has exactly zero gradient and does not move
    grad0 = (2 * (start @ gram - target)).to(torch.float32)
    gram32 = (2 * gram).to(torch.float32)
    step = torch.zeros_like(grad0)
    opt = torch.optim.Adam([step], lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for _ in range(steps):
        step.grad = torch.addmm(grad0, step, gram32)
        opt.step()
    return (start + step.to(torch.float64)).reshape(shape).to(deltas[0].device, dtype)
