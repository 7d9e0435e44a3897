"""Merge-Lock (a post-hoc merge defense): per attention head, random invertible matrices A (on Q/K) and
B (on V/O) that leave the function unchanged,

    q' = A q, k' = A⁻ᵀ k  ⇒  q'ᵀk' = qᵀk;     v' = B v, O'_h = O_h B⁻¹  ⇒  O'_h v' = O_h v,

applied to the weights and biases of each head. Other fine-tunes of the same base no longer line up with
the locked model, so averaging with it fails.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trap2.defenses.layout import find_layers, head_slices


def _random_invertible(d: int, gen: torch.Generator, spread: float) -> torch.Tensor:
    """A well-conditioned random matrix: orthogonal × diag(log-uniform in [1/spread, spread]) × orthogonal."""
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    log = torch.log(torch.tensor(spread, dtype=torch.float64))
    s = torch.exp((2 * torch.rand(d, generator=gen, dtype=torch.float64) - 1) * log)
    return q1 @ torch.diag(s) @ q2


@torch.no_grad()
def merge_lock(
    state: Mapping[str, torch.Tensor],
    n_heads: int,
    seed: int = 0,
    spread: float = 4.0,
    apply_to: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The locked full weights of ``state`` (or, with ``apply_to``, the same lock on those tensors alone,
    e.g. an adapter's dense ΔW)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in (state if apply_to is None else apply_to).items()}
    for layer in find_layers(state, n_heads):
        for sl in head_slices(layer, state):
            d = sl.stop - sl.start
            a = _random_invertible(d, gen, spread)
            b = _random_invertible(d, gen, spread)
            a_inv_t = torch.linalg.inv(a).T
            for name, m in ((layer.q, a), (layer.k, a_inv_t), (layer.v, b)):
                for suffix in (".weight", ".bias"):
                    t = out.get(name + suffix)
                    if t is not None:
                        t[sl] = (m @ t[sl].double()).to(t.dtype)
            o = out.get(f"{layer.o}.weight")
            if o is not None:
                o[:, sl] = (o[:, sl].double() @ torch.linalg.inv(b)).to(o.dtype)
    return out
