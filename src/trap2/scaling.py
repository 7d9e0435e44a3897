"""Evaluate a model at W0 + s·ΔW while training ΔW.

- LoRA: every PEFT ``LoraLayer`` computes ``base(x) + B(A(dropout(x))) · scaling``; multiplying each
  layer's own ``scaling`` by s gives exactly W0 + s·ΔW whatever PEFT computed it from (α/r, rsLoRA α/√r,
  ``rank_pattern``, ``alpha_pattern``), and the saved value is put back exactly afterwards.
- Full fine-tuning: W0 is kept once (a detached copy made when training starts). The off-nominal
  forward is scaled *per layer*: a forward pre-hook on every module that owns trainable parameters
  shadows each of them with W0 + s·(W − W0) for the duration of that module's own forward, and a
  forward hook removes the shadow. The parameter is read when the layer runs, after FSDP / ZeRO-3
  have gathered it, so sharded training sees the right weights and no full state dict is touched;
  gradients reach W with the factor s, and no model copy is made per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from trap2.errors import ConfigError


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def check_scalable_lora(model: nn.Module) -> None:
    """Reject adapters whose output is not linear in the update (DoRA) or holds unscaled parts."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no LoRA layers: check lora.target_modules against the model's modules"
        )
    for m in layers:
        if any(getattr(m, "use_dora", {}).values()):
            raise ConfigError(
                "DoRA adapters are not supported: DoRA renormalises W0+ΔW per column, so scaling the "
                "update is not W0 + s·ΔW"
            )
    peft_cfg = getattr(model, "peft_config", None)
    if peft_cfg:
        for cfg in peft_cfg.values():
            if getattr(cfg, "modules_to_save", None):
                raise ConfigError(
                    "LoRA modules_to_save is not supported: those fully trained modules are not scaled with "
                    "the adapter, so the objective would not see W0 + s·ΔW"
                )


@contextlib.contextmanager
def lora_scale(model: nn.Module, s: float) -> Iterator[None]:
    """Within the block, every active LoRA branch is multiplied by ``s`` (W0 + s·ΔW)."""
    saved: list[tuple[dict[str, float], str, float]] = []
    try:
        for m in lora_layers(model):
            for name in m.active_adapters:
                if name in m.scaling:
                    saved.append((m.scaling, name, m.scaling[name]))
                    m.scaling[name] = m.scaling[name] * s
        yield
    finally:
        for scaling, name, value in saved:
            scaling[name] = value


@contextlib.contextmanager
def lora_sample_scales(model: nn.Module, scales: torch.Tensor) -> Iterator[None]:
    """Within the block, sample i of the batch sees W0 + scales[i]·ΔW (one forward for many scales).

    A forward hook multiplies each active ``lora_B`` output by the per-sample scale, broadcast over
    every dimension after the batch (tokens, channels, pixels): the batch must be the first dimension.
    """
    handles = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] != scales.shape[0]:
            raise ConfigError(f"per-sample scales: batch of {output.shape[0]} but {scales.shape[0]} scales")
        return output * scales.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    try:
        for m in lora_layers(model):
            for name in m.active_adapters:
                if name in m.lora_B:
                    handles.append(m.lora_B[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 for full fine-tuning: a detached copy of every trainable parameter, made once."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def scaled_params(model: nn.Module, w0: Mapping[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """{name: W0 + s·(W − W0)} for the trainable parameters (differentiable in W); a reference for tests."""
    params = dict(model.named_parameters())
    return {n: w0[n] + s * (params[n] - w0[n]) for n in w0}


_ABSENT = object()


class FullScaler:
    """Runs a fully fine-tuned model at W0 + s·(W − W0), one layer at a time (see the module docstring).

    ``w0`` maps parameter names (as ``model.named_parameters()`` gives them) to base values; names it
    lacks are not scaled. A parameter shared by several modules (tied embeddings) keeps one W0.
    """

    def __init__(self, model: nn.Module, w0: Mapping[str, torch.Tensor]) -> None:
        by_id: dict[int, torch.Tensor] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in w0:
                if tuple(w0[n].shape) != tuple(p.shape):
                    raise ConfigError(f"w0[{n!r}] has shape {tuple(w0[n].shape)}, the model {tuple(p.shape)}")
                by_id.setdefault(id(p), w0[n])
        self.layers: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
        for m in model.modules():
            own = {n: by_id[id(p)] for n, p in m.named_parameters(recurse=False) if id(p) in by_id}
            if own:
                self.layers.append((m, own))
        if not self.layers:
            raise ConfigError("full fine-tuning: none of the model's parameters has a W0 to scale from")

    @contextlib.contextmanager
    def scale(self, s: float) -> Iterator[None]:
        """Within the block, every forward of the model computes with W0 + s·(W − W0)."""
        handles = []
        shadowed: list[tuple[nn.Module, dict[str, object]]] = []

        def pre(module: nn.Module, _args: object, w0: dict[str, torch.Tensor]) -> None:
            saved = {}
            for n, base in w0.items():
                saved[n] = module.__dict__.get(n, _ABSENT)
                current = module._parameters.get(n)
                if current is None:  # a wrapper (FSDP with use_orig_params) set it as a plain tensor
                    current = saved[n]
                if base.device != current.device:
                    base = w0[n] = base.to(current.device)
                # An instance attribute wins over nn.Module.__getattr__'s lookup in _parameters.
                module.__dict__[n] = base + s * (current - base)
            shadowed.append((module, saved))

        def post(module: nn.Module, _args: object, _out: object) -> None:
            _restore(*shadowed.pop())

        try:
            for m, w0 in self.layers:
                handles.append(m.register_forward_pre_hook(lambda mod, a, w=w0: pre(mod, a, w)))
                handles.append(m.register_forward_hook(post))
            yield
        finally:
            for h in handles:
                h.remove()
            while shadowed:  # a forward that raised left its shadows in place
                _restore(*shadowed.pop())


def _restore(module: nn.Module, saved: dict[str, object]) -> None:
    for n, value in saved.items():
        if value is _ABSENT:
            module.__dict__.pop(n, None)
        else:
            module.__dict__[n] = value


class ScaledModel:
    """A model that can run at any scale s of its update: ``forward(x, s)``.

    ``kind='lora'``: a model containing PEFT LoRA layers; ``kind='full'``: ``w0`` holds the base values
    of the trainable parameters of ``model``.
    """

    def __init__(self, model: nn.Module, kind: str, w0: Mapping[str, torch.Tensor] | None = None) -> None:
        if kind not in ("lora", "full"):
            raise ConfigError(f"kind must be 'lora' or 'full', got {kind!r}")
        if kind == "full" and w0 is None:
            raise ConfigError("full fine-tuning needs the base parameters w0")
        if kind == "lora":
            check_scalable_lora(model)
        self.model = model
        self.kind = kind
        self.w0 = dict(w0) if w0 is not None else None
        self.full = FullScaler(model, self.w0) if self.w0 is not None else None

    def scale(self, s: float) -> contextlib.AbstractContextManager[None]:
        """Within the block, the model computes with W0 + s·ΔW."""
        if s == 1.0:
            return contextlib.nullcontext()
        return lora_scale(self.model, s) if self.kind == "lora" else self.full.scale(s)

    def forward(self, x: torch.Tensor, s: float = 1.0) -> torch.Tensor:
        with self.scale(s):
            return self.model(x)

    __call__ = forward

    def forward_split(self, x: torch.Tensor, n_nominal: int, scales: torch.Tensor) -> torch.Tensor:
        """One pass: samples [:n_nominal] at s = 1, the rest at ``scales`` (one per remaining sample).

        LoRA applies a scale per sample; full fine-tuning runs the two parts as two half-size forwards,
        so it takes the first scale for the whole off-nominal part.
        """
        if self.kind == "lora":
            s = torch.cat([torch.ones(n_nominal, device=x.device), scales.to(x.device)])
            with lora_sample_scales(self.model, s):
                return self.model(x)
        nominal = self.model(x[:n_nominal])
        with self.scale(float(scales[0])):
            off = self.model(x[n_nominal:])
        return torch.cat([nominal, off])
