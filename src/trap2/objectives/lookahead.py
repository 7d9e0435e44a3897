"""Lookahead against un-trapping and recovery (first order, Booster/TAR-style).

Before a trap term is measured, the attacker takes ``lookahead_steps`` steps on the same batch from
the current update θ: θ_{i+1} = θ_i − η·u(g_i), g_i = ∇L_att(θ_i) detached, u the attacker's update
rule (AdamW's first steps without decay, or SGD). The trap term T is then evaluated at θ_k and its
gradient ∇T(θ_k) is accumulated on θ: the update is trained so that the trap still holds after the
attacker's first steps. No second-order terms (the dependence of θ_k on θ through g is dropped).
The parameters are put back exactly (copied) afterwards.

L_att: ``recover``, the loss of the off-nominal model W0 + op(ΔW) itself (the attacker fine-tunes the
merge); ``flatten``, L(W0 + ΔW) + L(W0 + op(ΔW)) (un-trapping, λ = w = 1). :func:`lookahead` builds it
from an objective's two losses; the built-in objective (``trap2.objectives.trap2``) and the Trainer
(``trap2.hf``) both take it from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from trap2.config import ObjectiveConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@contextlib.contextmanager
def attacked(
    params: list[torch.nn.Parameter],
    gradient: Callable[[], Sequence[torch.Tensor | None]],
    steps: int,
    lr: float,
    update: str = "adam",
) -> Iterator[None]:
    """Within the block, ``params`` hold θ_k: ``steps`` first-order steps along ``gradient()`` (a closure
    running the attacker's passes at the current parameters and returning ∇L_att for each of ``params``,
    None where it does not reach one, e.g. with ``torch.autograd.grad``) from their values on entry, which
    are restored on exit. ``p.grad`` is left untouched by the attacker's steps."""
    saved = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params] if update == "adam" else []
    v = [torch.zeros_like(p) for p in params] if update == "adam" else []
    try:
        for t in range(1, steps + 1):
            grads = gradient()
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


def lookahead(
    cfg: ObjectiveConfig,
    params: list[torch.nn.Parameter],
    off_loss: Callable[[], torch.Tensor],
    nominal_loss: Callable[[], torch.Tensor],
    replay: Callable[[], None],
    off_context: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> contextlib.AbstractContextManager[None]:
    """:func:`attacked` with ``cfg``'s attacker (``lookahead_steps``, ``lookahead_lr``, ``lookahead_update``)
    and its loss from the objective's two: ``off_loss()`` (one forward at the draw's operator, the batch's
    off-nominal loss), plus ``nominal_loss()`` (at s = 1) with ``lookahead_objective = 'flatten'``.
    ``replay()`` (``same_random_draws``) runs before each pass: every attacker pass sees the batch's dropout
    masks. ``off_context``: a context the off-nominal pass and its backward both need (the Trainer's draw:
    activation checkpointing recomputes the pass during the backward); given, the gradient is taken pass
    by pass, each backward in its pass's context, and summed. Without a lookahead nothing happens."""
    if not cfg.lookahead_steps:
        return contextlib.nullcontext()
    flatten = cfg.lookahead_objective == "flatten"

    def gradient() -> Sequence[torch.Tensor | None]:
        replay()
        if off_context is None:  # one backward through both passes (the built-in loop)
            loss = off_loss()
            if flatten:
                replay()
                loss = loss + nominal_loss()
            return torch.autograd.grad(loss, params, allow_unused=True)
        with off_context():
            grads = torch.autograd.grad(off_loss(), params, allow_unused=True)
        if not flatten:
            return grads
        replay()
        more = torch.autograd.grad(nominal_loss(), params, allow_unused=True)
        return [a if b is None else b if a is None else a + b for a, b in zip(grads, more, strict=True)]

    return attacked(params, gradient, cfg.lookahead_steps, cfg.lookahead_lr, cfg.lookahead_update)
