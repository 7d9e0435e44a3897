"""The released thing: an update ΔW, keyed by the base model's parameter names.

Each entry is either :class:`LowRank` (a PEFT LoRA branch: A, B and its scaling, read exactly as PEFT
defines it, ``rank_pattern``, ``alpha_pattern``, rsLoRA, ``fan_in_fan_out`` and ``lora_bias`` included)
or a dense tensor (full fine-tuning: W − W0 for every trainable parameter).

On disk:
- LoRA: a standard PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) plus
  ``trap2.json``; the protection settings also go into the safetensors header metadata (key ``trap2``),
  never into ``adapter_config.json`` (PEFT warns on unknown keys).
- Dense: a folder with ``delta.safetensors`` (+ ``trap2.json``), or a bare ``.safetensors`` of deltas.
An update is written as an adapter when PEFT can hold every entry (LoRA branches, plus ``lora_bias``
biases); any other mix (a KnOTS merge of a full fine-tune: low-rank matrices, dense norms) is written
dense, which ``load_update`` reads back exactly (see :attr:`Update.kind`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trap2.errors import UpdateFileError
from trap2.io import atomic_dir, load_tensors, open_tensors, read_json, save_tensors, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
DENSE_WEIGHTS = "delta.safetensors"
SIDECAR = "trap2.json"
PEFT_PREFIX = "base_model.model."
STATE_FINGERPRINT = "tensors-sha256:"  # prefix of a fingerprint computed from tensors, not from a file


def tensors_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of base weights held in memory: sha256 over every (name, shape, float32 bytes) in name
    order, prefixed with :data:`STATE_FINGERPRINT`. The float32 view makes a bf16 or fp16 base agree with
    its exact float32 upcast. Suites loaded from files record the file's sha256 instead
    (``trap2.data.prepare.weights_fingerprint``); :meth:`Update.check_base` compares either kind."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return STATE_FINGERPRINT + h.hexdigest()


@dataclass(frozen=True)
class LowRank:
    """ΔW = scaling · B @ A (transposed if ``fan_in_fan_out``); conv kernels keep A's kernel dims."""

    A: torch.Tensor  # (r, in) or (r, in, kh, kw)
    B: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        a = self.A.reshape(self.A.shape[0], -1).to(torch.float32)
        b = self.B.reshape(self.B.shape[0], -1).to(torch.float32)
        if b.shape[1] != a.shape[0]:
            raise UpdateFileError(
                f"LoRA factors do not chain: B {tuple(self.B.shape)} vs A {tuple(self.A.shape)}"
            )
        delta = (b @ a) * self.scaling  # (out, in·kh·kw)
        if self.A.dim() == 4:
            return delta.reshape(self.B.shape[0], *self.A.shape[1:])
        return delta.T if self.fan_in_fan_out else delta


Delta = LowRank | torch.Tensor


@dataclass
class Update:
    """ΔW per base parameter name, plus metadata (kind, base fingerprint, protection settings)."""

    deltas: dict[str, Delta]
    meta: dict[str, Any] = field(default_factory=dict)
    peft_config: dict[str, Any] | None = None  # the adapter_config.json this update came from, if LoRA

    @property
    def kind(self) -> str:
        """How the update is written: ``lora`` (a PEFT adapter) when every entry is a LoRA branch, or a
        bias of a module that has one (PEFT's ``lora_bias``, on every such module); else ``dense``, which
        holds any mix (a KnOTS merge of a full fine-tune: low-rank matrices, dense norms) exactly."""
        low = {k: d for k, d in self.deltas.items() if isinstance(d, LowRank)}
        others = set(self.deltas) - set(low)
        adapter = bool(low) and all(k.endswith(".weight") for k in low)
        if others:  # lora_bias: the bias is stored unscaled, so the scaling must be invertible
            biases = {f"{k.removesuffix('.weight')}.bias" for k in low}
            adapter = adapter and others == biases and all(d.scaling != 0 for d in low.values())
        return "lora" if adapter else "dense"

    def dense(self) -> dict[str, torch.Tensor]:
        return {
            k: (d.dense() if isinstance(d, LowRank) else d.to(torch.float32)) for k, d in self.deltas.items()
        }

    def check_base(
        self, base: Mapping[str, torch.Tensor], fingerprint: str | None = None, where: str = "update"
    ) -> None:
        """Every delta must name a base parameter of the same shape, and a recorded base must match."""
        for name, d in self.dense().items():
            if name not in base:
                raise UpdateFileError(f"{where}: tensor {name!r} has no counterpart in the base model")
            if tuple(d.shape) != tuple(base[name].shape):
                raise UpdateFileError(
                    f"{where}: tensor {name!r} has shape {tuple(d.shape)} but the base has {tuple(base[name].shape)}"
                )
        fp = self.meta.get("base_fingerprint")
        if not fp or not fingerprint or fp == fingerprint:
            return
        if fp.startswith(STATE_FINGERPRINT):  # recorded from the weights themselves: hash this base's
            here = tensors_fingerprint(base)
            if fp == here:
                return
            fingerprint = here
        theirs, ours = (f.removeprefix(STATE_FINGERPRINT)[:12] for f in (fp, fingerprint))
        raise UpdateFileError(f"{where}: made for base {theirs}…, not this base ({ours}…)")

    # --- construction from a trained model ----------------------------------------------------------

    @classmethod
    def from_peft_model(
        cls, model: nn.Module, adapter: str = "default", meta: dict[str, Any] | None = None
    ) -> Update:
        """Read the LoRA branches of a live PEFT model (names relative to the base model)."""
        from trap2.scaling import lora_layers

        deltas: dict[str, Delta] = {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = {id(m): n for n, m in base.named_modules()}
        for m in lora_layers(base):
            if adapter not in m.lora_A:
                continue
            name = names[id(m)]
            fan = bool(getattr(m, "fan_in_fan_out", False))
            deltas[f"{name}.weight"] = LowRank(
                m.lora_A[adapter].weight.detach().clone(),
                m.lora_B[adapter].weight.detach().clone(),
                float(m.scaling[adapter]),
                fan,
            )
            bias = getattr(m.lora_B[adapter], "bias", None)
            if bias is not None:
                deltas[f"{name}.bias"] = bias.detach().clone() * float(m.scaling[adapter])
        cfg = model.peft_config[adapter].to_dict() if hasattr(model, "peft_config") else None
        return cls(deltas, dict(meta or {}), _jsonable(cfg) if cfg else None)

    @classmethod
    def from_full(
        cls,
        params: Mapping[str, torch.Tensor],
        w0: Mapping[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
    ) -> Update:
        """ΔW = W − W0 over every parameter in ``w0``."""
        return cls({n: (params[n].detach() - w0[n]).clone() for n in w0}, dict(meta or {}))

    # --- files -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], peft_model: nn.Module | None = None) -> Path:
        """Write the update folder atomically (see the module docstring for the layout)."""
        out = Path(path)
        with atomic_dir(out) as tmp:
            self.write_into(tmp, peft_model)
        return out

    def write_into(self, folder: Path, peft_model: nn.Module | None = None) -> None:
        """Write the update's files into an existing (temporary) folder; callers that add files of
        their own (a merged checkpoint) wrap this and those files in one ``atomic_dir``."""
        meta_json = json.dumps(self.meta, sort_keys=True)
        if self.kind == "lora":  # else dense: any mix of low-rank and dense entries is written as ΔW
            if peft_model is not None:
                peft_model.save_pretrained(str(folder))
                tensors, _ = load_tensors(folder / ADAPTER_WEIGHTS)
            else:
                tensors = self._peft_tensors()
                write_json(folder / ADAPTER_CONFIG, self._peft_config_dict())
            save_tensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt", "trap2": meta_json})
        else:
            save_tensors(folder / DENSE_WEIGHTS, self.dense(), {"format": "pt", "trap2": meta_json})
        write_json(folder / SIDECAR, {"kind": self.kind, **self.meta})

    def _peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys; a dense bias ΔB of a LoRA module is its ``lora_B.bias`` (PEFT scales it: ΔB/s)."""
        out = {}
        for key, d in self.deltas.items():
            if not isinstance(d, LowRank):
                continue
            mod = key.removesuffix(".weight")
            out[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = d.A
            out[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = d.B
            bias = self.deltas.get(f"{mod}.bias")
            if bias is not None:
                out[f"{PEFT_PREFIX}{mod}.lora_B.bias"] = bias / d.scaling
        return out

    def _peft_config_dict(self) -> dict[str, Any]:
        """A LoraConfig reproducing each module's rank and scaling (α = scaling·r per module)."""
        from peft import LoraConfig

        items = [(k.removesuffix(".weight"), d) for k, d in self.deltas.items() if isinstance(d, LowRank)]
        r0, s0 = items[0][1].rank, items[0][1].scaling
        rank_pattern = {re.escape(m): d.rank for m, d in items if d.rank != r0}
        alpha_pattern = {
            re.escape(m): d.scaling * d.rank for m, d in items if d.scaling != s0 or d.rank != r0
        }
        cfg = LoraConfig(
            r=r0,
            lora_alpha=s0 * r0,
            target_modules=sorted({m for m, _ in items}),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=items[0][1].fan_in_fan_out,
            lora_bias=len(items) < len(self.deltas),
        )
        return _jsonable(cfg.to_dict())


class _LazyDeltas(Mapping[str, "Delta"]):
    """name -> Delta, built from lazily read tensors on access (streaming merges)."""

    def __init__(self, names: list[str], build: Any) -> None:
        self._names, self._build = names, build

    def __getitem__(self, name: str) -> Delta:
        if name not in self._names:
            raise KeyError(name)
        return self._build(name)

    def __iter__(self) -> Any:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_update(path: str | os.PathLike[str], lazy: bool = False, allow_legacy_bin: bool = False) -> Update:
    """Load an update from a PEFT adapter folder, a trap2 dense folder, or a dense ``.safetensors``.

    ``lazy=True`` reads each tensor only when it is used (and checks it then), so a merge of many
    updates holds a few tensors at a time. Pickles are never unpickled; ``allow_legacy_bin=True`` reads a
    PEFT ``adapter_model.bin`` through ``torch.load(weights_only=True)``, which refuses any code.
    """
    p = Path(path)
    if not p.exists():
        raise UpdateFileError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / ADAPTER_CONFIG).is_file():
            return _load_peft(p, lazy, allow_legacy_bin)
        if (p / DENSE_WEIGHTS).is_file():
            return _load_dense(p / DENSE_WEIGHTS, lazy)
        raise UpdateFileError(
            f"{p}: neither a PEFT adapter ({ADAPTER_CONFIG}) nor a dense update ({DENSE_WEIGHTS})"
        )
    if p.suffix == ".safetensors":
        return _load_dense(p, lazy)
    raise UpdateFileError(f"{p}: unsupported update file (want a PEFT adapter folder or a .safetensors file)")


def _meta_from(header: Mapping[str, str], where: Path) -> dict[str, Any]:
    raw = header.get("trap2")
    if raw is None:
        sidecar = where.parent / SIDECAR if where.is_file() else where / SIDECAR
        if sidecar.is_file():
            meta = read_json(sidecar)
            meta.pop("kind", None)
            return meta
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise UpdateFileError(f"{where}: the 'trap2' header metadata is not valid JSON") from None


def _load_dense(path: Path, lazy: bool = False) -> Update:
    tensors, header = open_tensors(path, lazy=lazy)
    if not len(tensors):
        raise UpdateFileError(f"{path}: holds no tensors")

    def checked(k: str) -> torch.Tensor:
        t = tensors[k]
        if not t.is_floating_point():
            raise UpdateFileError(
                f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point delta"
            )
        return t

    deltas: Mapping[str, Delta] = (
        _LazyDeltas(list(tensors), checked) if lazy else {k: checked(k) for k in tensors}
    )
    return Update(deltas, _meta_from(header, path))  # type: ignore[arg-type]


def _load_legacy_bin(path: Path) -> dict[str, torch.Tensor]:
    """A legacy PyTorch adapter file, through torch's restricted unpickler only (no code runs)."""
    import pickle

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise UpdateFileError(
            f"{path}: refused by torch.load(weights_only=True) ({str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
        raise UpdateFileError(f"{path}: not a mapping of tensor names to tensors")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateFileError(f"{path}: tensor {key!r} contains NaN or Inf")
    return tensors


def _load_peft(folder: Path, lazy: bool = False, allow_legacy_bin: bool = False) -> Update:
    from peft.utils.other import get_pattern_key

    cfg = read_json(folder / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UpdateFileError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise UpdateFileError(
            f"{folder}: DoRA adapters are not a linear update W0 + ΔW and are not supported"
        )
    weights = folder / ADAPTER_WEIGHTS
    legacy = folder / LEGACY_WEIGHTS
    if weights.is_file():
        tensors, header = open_tensors(weights, lazy=lazy)
    elif legacy.is_file() and allow_legacy_bin:
        weights, tensors, header = legacy, _load_legacy_bin(legacy), {}
    else:
        raise UpdateFileError(
            f"{folder}: missing {ADAPTER_WEIGHTS} (only safetensors adapters are read; a legacy "
            f"{LEGACY_WEIGHTS} needs allow_legacy_bin=True, which reads it with torch.load(weights_only=True))"
        )
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora, fan = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    modules = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    if not modules:
        raise UpdateFileError(f"{weights}: no lora_A/lora_B tensors found")
    unused = (
        set(tensors)
        - {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}
        - {f"{m}.lora_B.bias" for m in modules}
    )
    if unused:
        raise UpdateFileError(
            f"{weights}: tensors outside LoRA branches are not supported (e.g. {sorted(unused)[0]!r}; "
            "modules_to_save would not be scaled with the update)"
        )
    for key in modules:
        if f"{key}.lora_B.weight" not in tensors:
            raise UpdateFileError(f"{weights}: {key}.lora_A.weight has no matching lora_B.weight")

    def scaling_of(name: str, rank: int, key: str) -> float:
        r_m = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r))
        a_m = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha))
        if r_m != rank:
            raise UpdateFileError(f"{weights}: {key}: config says rank {r_m}, tensors have rank {rank}")
        return a_m / math.sqrt(r_m) if rslora else a_m / r_m

    def build(param: str) -> Delta:
        name, kind = param.rsplit(".", 1)
        key = PEFT_PREFIX + name
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        if a.shape[0] != b.shape[1]:
            raise UpdateFileError(f"{weights}: {key}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
        scaling = scaling_of(name, int(a.shape[0]), key)
        return LowRank(a, b, scaling, fan) if kind == "weight" else tensors[f"{key}.lora_B.bias"] * scaling

    names = [f"{m.removeprefix(PEFT_PREFIX)}.weight" for m in modules]
    names += [f"{m.removeprefix(PEFT_PREFIX)}.bias" for m in modules if f"{m}.lora_B.bias" in tensors]
    deltas: Mapping[str, Delta] = _LazyDeltas(names, build) if lazy else {n: build(n) for n in names}
    return Update(deltas, _meta_from(header, folder), cfg)


def apply_delta(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], coefficient: float = 1.0
) -> dict[str, torch.Tensor]:
    """{name: W0 + c·ΔW} for the parameters the delta touches (for ``functional_call``)."""
    return {n: base[n] + coefficient * d.to(base[n].device, base[n].dtype) for n, d in delta.items()}


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (set, tuple, list)):
        return [_jsonable(v) for v in (sorted(d) if isinstance(d, set) else d)]
    if hasattr(d, "value") and not isinstance(d, (int, float, str, bool)):
        return d.value  # enums (peft_type, task_type)
    return d
