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

Beyond one scale for the whole update, :meth:`ScaledModel.transformed` runs the model with each part
of the update (a :class:`Unit`: one LoRA layer's adapter, or one fully trained tensor) replaced by a
:data:`Transform` of it: its own scale (:class:`Scale`, exact as above), a differentiable function of
its dense ΔW (:class:`Dense`: a trim, a spectral reweighting), or, for LoRA, a function of its factors
that returns new low-rank factors (:class:`Factors`). The hardened objective's operators
(``trap2.objectives.operators``) are built on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class Scale:
    """The unit computes with W0 + s·ΔW (LoRA: its ``scaling`` times s, exact)."""

    s: float


@dataclass(frozen=True)
class Dense:
    """The unit computes with W0 + fn(ΔW), ``fn`` a differentiable map of the dense (out, in) ΔW."""

    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Factors:
    """LoRA only: with ΔW = (c·B)·A, the unit computes with W0 + P·Q where (P, Q) = fn(c·B, A),
    P (out, k), Q (k, in); nothing of size out × in is formed."""

    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


Transform = Scale | Dense | Factors


@dataclass(frozen=True)
class Unit:
    """One matrix (or tensor) of the update. LoRA: an adapter of one layer, ΔW = scaling·B·A with
    ``b`` (out, r) and ``a`` (r, in); full: a trainable parameter ``w`` and its base ``w0``."""

    name: str
    kind: str  # 'lora' or 'dense'
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    scaling: float = 1.0
    w: torch.Tensor | None = None
    w0: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        """The dense ΔW (differentiable in the trainable tensors)."""
        if self.kind == "lora":
            return (self.scaling * self.b) @ self.a
        return self.w - self.w0.to(self.w.device)


def _lora_units(model: nn.Module) -> list[tuple[Unit, nn.Module, str]]:
    """(unit, LoRA layer, adapter name) for every active adapter; the unit is named after the layer
    (``layer/adapter`` when a layer has several active adapters)."""
    out = []
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or not hasattr(m, "scaling"):
            continue
        active = [a for a in m.active_adapters if a in m.lora_A and a in m.scaling]
        for adapter in active:
            a, b = m.lora_A[adapter], m.lora_B[adapter]
            unit_name = name if len(active) == 1 else f"{name}/{adapter}"
            w_a, w_b = getattr(a, "weight", None), getattr(b, "weight", None)
            if w_a is None or w_a.dim() != 2 or w_b is None or w_b.dim() != 2:
                w_a = w_b = None  # not a Linear adapter: only Scale applies to it
            out.append((Unit(unit_name, "lora", b=w_b, a=w_a, scaling=float(m.scaling[adapter])), m, adapter))
    return out


@contextlib.contextmanager
def lora_transform(model: nn.Module, transforms: Mapping[str, Transform]) -> Iterator[None]:
    """Within the block, each LoRA unit named in ``transforms`` computes with its transform (units left
    out stay as they are). A :class:`Dense` or :class:`Factors` unit has its own branch switched off
    (``scaling`` 0) and a forward hook adds the transformed update's output, on the layer's input
    without LoRA dropout; Linear adapters only."""
    from peft.tuners.lora import Linear as LoraLinear

    saved: list[tuple[dict[str, float], str, float]] = []
    handles = []
    try:
        for unit, m, adapter in _lora_units(model):
            t = transforms.get(unit.name)
            if t is None:
                continue
            saved.append((m.scaling, adapter, m.scaling[adapter]))
            if isinstance(t, Scale):
                m.scaling[adapter] = m.scaling[adapter] * t.s
                continue
            if not isinstance(m, LoraLinear) or unit.b is None or getattr(m, "lora_bias", {}).get(adapter):
                raise ConfigError(
                    f"{unit.name}: only Linear LoRA layers without lora_bias take a trim or spectral "
                    "operator (the others take 'scale' and 'layer_scale')"
                )
            m.scaling[adapter] = 0.0
            handles.append(m.register_forward_hook(_added_output(unit, t)))
        yield
    finally:
        for h in handles:
            h.remove()
        for scaling, name, value in saved:
            scaling[name] = value


def _added_output(unit: Unit, t: Transform) -> Callable[..., torch.Tensor]:
    """A forward hook adding x·op(ΔW)ᵀ to a LoRA layer's output (its own branch is switched off)."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(unit.a.dtype)
        if isinstance(t, Factors):
            p, q = t.fn(unit.scaling * unit.b, unit.a)  # (out, k), (k, in)
            extra = F.linear(F.linear(x, q), p)
        else:
            extra = F.linear(x, t.fn(unit.delta()))
        return output + extra.to(output.dtype)

    return hook


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
        named: dict[int, str] = {}  # a tied parameter goes by its first name
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in w0:
                if tuple(w0[n].shape) != tuple(p.shape):
                    raise ConfigError(f"w0[{n!r}] has shape {tuple(w0[n].shape)}, the model {tuple(p.shape)}")
                by_id.setdefault(id(p), w0[n])
                named.setdefault(id(p), n)
        self.layers: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
        self.names: dict[tuple[int, str], str] = {}  # (id(module), own name) -> model-level name
        for m in model.modules():
            own = {n: by_id[id(p)] for n, p in m.named_parameters(recurse=False) if id(p) in by_id}
            if own:
                self.layers.append((m, own))
                for n, p in m.named_parameters(recurse=False):
                    if id(p) in by_id:
                        self.names[(id(m), n)] = named[id(p)]
        if not self.layers:
            raise ConfigError("full fine-tuning: none of the model's parameters has a W0 to scale from")

    def scale(self, s: float) -> contextlib.AbstractContextManager[None]:
        """Within the block, every forward of the model computes with W0 + s·(W − W0)."""
        return self._shadow(lambda _name: lambda d: s * d)

    def transformed(self, transforms: Mapping[str, Transform]) -> contextlib.AbstractContextManager[None]:
        """Within the block, each parameter named in ``transforms`` (a :class:`Scale` or :class:`Dense`)
        is W0 + op(W − W0); the others are W as they are."""
        for name, t in transforms.items():
            if isinstance(t, Factors):
                raise ConfigError(f"{name}: a Factors transform applies to LoRA units only")
        ops = {
            name: (lambda d, s=t.s: s * d) if isinstance(t, Scale) else t.fn for name, t in transforms.items()
        }
        return self._shadow(ops.get)

    @contextlib.contextmanager
    def _shadow(
        self, op_for: Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None]
    ) -> Iterator[None]:
        """Within the block, each parameter whose ``op_for(name)`` is not None computes as
        W0 + op(W − W0), one layer at a time."""
        handles = []
        shadowed: list[tuple[nn.Module, dict[str, object]]] = []

        def pre(module: nn.Module, _args: object, w0: dict[str, torch.Tensor]) -> None:
            saved = {}
            for n, base in w0.items():
                op = op_for(self.names[(id(module), n)])
                if op is None:
                    continue
                saved[n] = module.__dict__.get(n, _ABSENT)
                current = module._parameters.get(n)
                if current is None:  # a wrapper (FSDP with use_orig_params) set it as a plain tensor
                    current = saved[n]
                if base.device != current.device:
                    base = w0[n] = base.to(current.device)
                # An instance attribute wins over nn.Module.__getattr__'s lookup in _parameters.
                module.__dict__[n] = base + op(current - base)
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

    def units(self) -> list[Unit]:
        """The parts of the update an operator acts on: one per LoRA adapter of a layer, or one per
        trainable tensor (full fine-tuning), in model order."""
        if self.kind == "lora":
            return [u for u, _m, _a in _lora_units(self.model)]
        params = dict(self.model.named_parameters())
        return [Unit(n, "dense", w=params[n], w0=self.w0[n]) for n in params if n in self.w0]

    def transformed(self, transforms: Mapping[str, Transform]) -> contextlib.AbstractContextManager[None]:
        """Within the block, each unit named in ``transforms`` computes with W0 + op(ΔW)."""
        if self.kind == "lora":
            return lora_transform(self.model, transforms)
        return self.full.transformed(transforms)

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
