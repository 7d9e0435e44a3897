"""Lookahead against un-trapping and recovery (first order, Booster/TAR-style).

Before a trap term is measured, the attacker takes ``lookahead_steps`` steps on the same batch from
the current update θ: θ_{i+1} = θ_i − η·u(g_i), g_i = ∇L_att(θ_i) detached, u the attacker's update
rule (AdamW's first steps without decay, or SGD). The trap term T is then evaluated at θ_k and its
gradient ∇T(θ_k) is accumulated on θ: the update is trained so that the trap still holds after the
attacker's first steps. No second-order terms (the dependence of θ_k on θ through g is dropped).
The parameters are put back exactly (copied) afterwards.

L_att: ``recover``, the loss of the off-nominal model W0 + op(ΔW) itself (the attacker fine-tunes the
merge); ``flatten``, L(W0 + ΔW) + L(W0 + op(ΔW)) (un-trapping, λ = w = 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@contextlib.contextmanager
def attacked(
    params: list[torch.nn.Parameter],
    attacker_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    update: str = "adam",
) -> Iterator[None]:
    """Within the block, ``params`` hold θ_k: ``steps`` first-order steps of ``attacker_loss`` (a
    closure running the forward passes at the current parameters) from their values on entry, which
    are restored on exit. ``p.grad`` is left untouched by the attacker's steps."""
    saved = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params] if update == "adam" else []
    v = [torch.zeros_like(p) for p in params] if update == "adam" else []
    try:
        for t in range(1, steps + 1):
            grads = torch.autograd.grad(attacker_loss(), params, allow_unused=True)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                    if g is None:
                        continue
                    if update == "sgd":
                        p.sub_(lr * g)
                        continue
                    b1, b2 = ADAM_BETAS
                    m[i].mul_(b1).add_(g, alpha=1 - b1)
                    v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                    m_hat = m[i] / (1 - b1**t)
                    v_hat = v[i] / (1 - b2**t)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + ADAM_EPS))
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
