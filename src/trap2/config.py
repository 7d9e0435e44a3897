"""Typed configs for protection, LoRA and training, validated on construction.

One config object drives YAML files, the CLI and the docs: each field carries its help text in
``metadata["help"]``; a bad value fails here, with a message that says what is valid.
:class:`ObjectiveConfig` is the one definition of the objective's knobs: the CLI's options
(``trap2.cli.objective_options``) and the Trainer's ``trap2_*`` arguments (``trap2.hf.trainer``) are
generated from its fields, so a field added here reaches both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from trap2.errors import ConfigError

WEIGHTINGS = ("inv", "inv_sqrt", "none")
SCALE_LAWS = ("uniform", "log")
MODES = ("lora", "full")
SELECTIONS = ("last", "best")
LOOKAHEAD_OBJECTIVES = ("recover", "flatten")
LOOKAHEAD_UPDATES = ("adam", "sgd")


def help_field(text: str, default: Any = dataclasses.MISSING, hash_default: bool = True, **kw: Any) -> Any:
    """A dataclass field carrying its help text (for the CLI and the docs).

    ``hash_default=False``: the field is left out of :func:`config_hash` while it holds its default, so
    a field added later does not change the cache keys of results made before it existed.
    """
    meta = {"help": text, "hash_default": hash_default}
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which training objective to use, and the Trap² knobs (ignored by ``none``)."""

    name: str = help_field("registered objective: 'none' (plain fine-tuning) or 'trap2'", "trap2")
    lam: float = help_field(
        "λ, weight of the off-nominal term (depends on the loss scale; 0.1 on digits)", 0.1
    )
    s_min: float = help_field("smallest sampled scale s (> 0)", 0.05)
    s_max: float = help_field("largest sampled scale s", 2.0)
    delta: float = help_field("half-width δ of the excluded band (1-δ, 1+δ) around the nominal scale", 0.05)
    weight: str = help_field("w(s): 'inv' = 1/s (vision), 'inv_sqrt' = 1/√s (LLM), 'none' = 1", "inv")
    n_samples: int = help_field("number of scales s drawn per step (the paper uses 1)", 1)
    law: str = help_field(
        "how s is drawn over [s_min, 1−δ] ∪ [1+δ, s_max]: 'uniform' (the paper) or 'log' (uniform in log s: "
        "as much mass on [0.05, 0.1] as on [0.475, 0.95]; a merge coefficient search ends at the small s)",
        "uniform",
        hash_default=False,
    )
    bound: float | None = help_field(
        "optional soft cap τ on the off-nominal loss: τ·tanh(L/τ) bounds −λ·w·L below; null = no cap", None
    )
    collateral: float = help_field(
        "μ (trap2 only): the off-nominal term also rewards μ·(1 − cos) between the backbone's features at "
        "W0 + s·ΔW and at W0, so an off-scale update breaks the other tasks of a merge too; 0 = the paper",
        0.0,
        hash_default=False,
    )
    balance: float | None = help_field(
        "ρ (trap2, trap2_distill): each step the trap terms' gradient is scaled down to at most ρ × the "
        "nominal term's gradient norm, so the nominal term keeps its share of AdamW's step once the trap "
        "term's gradient dwarfs it; null = the paper's plain sum",
        None,
        hash_default=False,
    )
    operators: str = help_field(
        "hardening (trap2, trap2_distill): the off-nominal operators each draw picks from, comma-separated: "
        "'scale' (the paper's s·ΔW), 'layer_scale' (one s per layer / tensor), 'trim' (top-k entries), "
        "'drop' (DARE), 'spectral' (top directions kept, tail scaled), 'isotropic' (flat spectrum); draws "
        "within δ of ΔW (‖op(ΔW) − ΔW‖/‖ΔW‖ < δ) are rejected. 'scale' alone = the paper",
        "scale",
        hash_default=False,
    )
    keep_min: float = help_field(
        "hardening: smallest fraction kept by 'trim' and 'drop' (entries) and 'spectral' (directions)",
        0.1,
        hash_default=False,
    )
    keep_max: float = help_field("hardening: largest kept fraction (see keep_min)", 0.9, hash_default=False)
    lookahead_steps: int = help_field(
        "hardening (trap2, trap2_distill): first-order attacker steps taken on the batch before each trap "
        "term, which is then measured (and its gradient taken) at the attacked update; 0 = the paper",
        0,
        hash_default=False,
    )
    lookahead_lr: float = help_field(
        "hardening: the attacker's learning rate in the lookahead", 1e-3, hash_default=False
    )
    lookahead_objective: str = help_field(
        "hardening: the attacker the lookahead anticipates: 'recover' (fine-tunes the off-nominal model "
        "W0 + op(ΔW) on the task's loss) or 'flatten' (un-trapping: L at s = 1 plus L at op)",
        "recover",
        hash_default=False,
    )
    lookahead_update: str = help_field(
        "hardening: the attacker's update rule in the lookahead: 'adam' (AdamW's first steps, β = 0.9, "
        "0.999, no decay) or 'sgd'",
        "adam",
        hash_default=False,
    )

    def __post_init__(self) -> None:
        _finite(self, "lam", "s_min", "s_max", "delta")
        if self.lam < 0:
            raise ConfigError(f"objective.lam must be >= 0, got {self.lam}")
        if not 0 < self.s_min < 1:
            raise ConfigError(f"objective.s_min must be in (0, 1), got {self.s_min}")
        if self.delta <= 0:
            raise ConfigError(f"objective.delta must be > 0, got {self.delta}")
        if self.delta >= 1 - self.s_min:
            raise ConfigError(
                f"objective.delta={self.delta} leaves no scales below 1: need delta < 1 - s_min = {1 - self.s_min:g}"
            )
        if self.s_max <= 1 + self.delta:
            raise ConfigError(
                f"objective.s_max={self.s_max} leaves no scales above 1: need s_max > 1 + delta = {1 + self.delta:g}"
            )
        if self.weight not in WEIGHTINGS:
            raise ConfigError(f"objective.weight must be one of {', '.join(WEIGHTINGS)}; got {self.weight!r}")
        if self.law not in SCALE_LAWS:
            raise ConfigError(f"objective.law must be one of {', '.join(SCALE_LAWS)}; got {self.law!r}")
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"objective.n_samples must be an integer >= 1, got {self.n_samples!r}")
        if self.bound is not None and not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"objective.bound must be null or a finite number > 0, got {self.bound}")
        if self.balance is not None and not (
            isinstance(self.balance, (int, float))
            and not isinstance(self.balance, bool)
            and math.isfinite(self.balance)
            and self.balance > 0
        ):
            raise ConfigError(f"objective.balance must be null or a finite number > 0, got {self.balance!r}")
        _finite(self, "collateral")
        if self.collateral < 0:
            raise ConfigError(f"objective.collateral must be >= 0, got {self.collateral}")
        self._check_hardening()

    def _check_hardening(self) -> None:
        from trap2.objectives.operators import OPERATORS  # registered there; imports this module

        ops = self.operators
        if isinstance(ops, (list, tuple)):
            ops = ",".join(str(o) for o in ops)
        if not isinstance(ops, str):
            raise ConfigError(f"objective.operators must be a comma-separated string or a list, got {ops!r}")
        names = [o.strip() for o in ops.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"objective.operators must name distinct operators, got {self.operators!r}")
        unknown = [n for n in names if n not in OPERATORS]
        if unknown:
            raise ConfigError(
                f"objective.operators: unknown operator {unknown[0]!r}; valid: {', '.join(OPERATORS.names())}"
            )
        object.__setattr__(self, "operators", ",".join(names))
        _finite(self, "keep_min", "keep_max", "lookahead_lr")
        if not 0 < self.keep_min <= self.keep_max <= 1:
            raise ConfigError(
                f"objective.keep_min/keep_max need 0 < keep_min <= keep_max <= 1, got {self.keep_min}, {self.keep_max}"
            )
        steps = self.lookahead_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"objective.lookahead_steps must be an integer >= 0, got {steps!r}")
        if self.lookahead_lr <= 0:
            raise ConfigError(f"objective.lookahead_lr must be > 0, got {self.lookahead_lr}")
        if self.lookahead_objective not in LOOKAHEAD_OBJECTIVES:
            raise ConfigError(
                f"objective.lookahead_objective must be one of {', '.join(LOOKAHEAD_OBJECTIVES)}; "
                f"got {self.lookahead_objective!r}"
            )
        if self.lookahead_update not in LOOKAHEAD_UPDATES:
            raise ConfigError(
                f"objective.lookahead_update must be one of {', '.join(LOOKAHEAD_UPDATES)}; "
                f"got {self.lookahead_update!r}"
            )

    @property
    def hardened(self) -> bool:
        """Whether an extension of the hardening is on (operators other than 'scale', a lookahead)."""
        return self.operators != "scale" or self.lookahead_steps > 0


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter trained in ``mode='lora'`` (passed to PEFT's ``LoraConfig``)."""

    r: int = help_field("LoRA rank", 8)
    alpha: float = help_field("LoRA α (PEFT scaling α/r, or α/√r with rsLoRA)", 8.0)
    dropout: float = help_field("dropout on the LoRA branch input", 0.0)
    target_modules: tuple[str, ...] | None = help_field(
        "module names to adapt; null = the suite's default", None
    )
    use_rslora: bool = help_field("rank-stabilised scaling α/√r", False)
    use_dora: bool = help_field("DoRA is not a linear rescaling of ΔW and is rejected", False)
    rank_pattern: dict[str, int] = help_field(
        "per-module rank overrides (PEFT rank_pattern)", default_factory=dict
    )
    alpha_pattern: dict[str, float] = help_field(
        "per-module α overrides (PEFT alpha_pattern)", default_factory=dict
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r must be an integer >= 1, got {self.r!r}")
        _finite(self, "alpha", "dropout")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.use_dora:
            raise ConfigError(
                "lora.use_dora=true is not supported: DoRA renormalises W0+ΔW per column, so scaling the "
                "update by s is not W0 + s·ΔW and the Trap² objective would train the wrong thing"
            )
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ConfigError("lora.target_modules must name at least one module (or be null)")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: the same optimiser, schedule and clipping for every objective."""

    mode: str = help_field("'lora' (PEFT adapter) or 'full' (every trainable backbone parameter)", "lora")
    objective: ObjectiveConfig = help_field("training objective", default_factory=ObjectiveConfig)
    lora: LoraSettings = help_field("LoRA settings (mode='lora')", default_factory=LoraSettings)
    steps: int = help_field("optimizer steps", 600)
    protect_steps: int | None = help_field(
        "optimizer steps of a protected run (any objective but 'none'); null = steps. The trap can need "
        "longer than plain fine-tuning to reach the same standalone accuracy",
        None,
        hash_default=False,
    )
    batch_size: int = help_field("mini-batch size", 64)
    lr: float | None = help_field("peak learning rate; null = 5e-3 for LoRA, 1e-3 for full", None)
    warmup_steps: int = help_field("linear warm-up steps before the cosine decay", 50)
    weight_decay: float = help_field("AdamW weight decay", 0.0)
    betas: tuple[float, float] = help_field("AdamW betas", (0.9, 0.98))
    eps: float = help_field("AdamW epsilon", 1e-6)
    grad_clip: float | None = help_field("gradient-norm clipping; null = off", 1.0)
    eval_every: int = help_field("validate every N steps (for 'best' selection and the log)", 100)
    select: str = help_field(
        "released checkpoint: 'last' step, or 'best' standalone validation accuracy", "last"
    )
    checkpoint_every: int | None = help_field(
        "save the full training state every N steps (for --resume); null = never", None
    )
    max_nonfinite_in_row: int = help_field(
        "stop with an error after this many skipped non-finite steps in a row", 20
    )
    seed: int = help_field("random seed (data order, LoRA init, sampled scales)", 0)
    device: str = help_field("'cpu', 'cuda', 'cuda:N' or 'auto'", "cpu")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("steps", "batch_size", "eval_every", "max_nonfinite_in_row"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.protect_steps is not None and (
            not isinstance(self.protect_steps, int)
            or isinstance(self.protect_steps, bool)
            or self.protect_steps < 1
        ):
            raise ConfigError(f"protect_steps must be null or an integer >= 1, got {self.protect_steps!r}")
        if self.checkpoint_every is not None and (
            not isinstance(self.checkpoint_every, int)
            or isinstance(self.checkpoint_every, bool)
            or self.checkpoint_every < 1
        ):
            raise ConfigError(
                f"checkpoint_every must be null or an integer >= 1, got {self.checkpoint_every!r}"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        _finite(self, "weight_decay", "eps")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be null or a finite number > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("weight_decay must be >= 0 and eps > 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be null or a finite number > 0, got {self.grad_clip}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}; got {self.select!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("cpu", "cuda", "auto", "mps") or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; got {self.device!r}")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-3 if self.mode == "lora" else 1e-3

    @property
    def run_steps(self) -> int:
        """The steps this run takes: ``protect_steps`` for a protected objective, else ``steps``."""
        if self.protect_steps is not None and self.objective.name != "none":
            return self.protect_steps
        return self.steps

    def resolved(self) -> TrainConfig:
        """This run as it trains: ``steps`` = :attr:`run_steps`, no ``protect_steps`` left to apply."""
        return dataclasses.replace(self, steps=self.run_steps, protect_steps=None)

    def plain(self) -> TrainConfig:
        """The unprotected run these settings are compared with: objective 'none', the same schedule."""
        return dataclasses.replace(self, objective=ObjectiveConfig(name="none"), protect_steps=None)


def _finite(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{type(obj).__name__}.{name} must be a finite number, got {v!r}")


# --- dict / YAML round trip -------------------------------------------------------------------------

C = TypeVar("C")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Build ``cls`` from a plain dict, recursing into nested configs; unknown keys are an error."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where or cls.__name__}; valid: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong value types that slipped past coercion
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts, used as a cache key."""
    blob = json.dumps([_hashable(p) for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _hashable(v: Any) -> Any:
    """``to_dict`` without the fields marked ``hash_default=False`` that hold their default."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        out = {}
        for f in dataclasses.fields(v):
            value = getattr(v, f.name)
            if not f.metadata.get("hash_default", True) and value == f.default:
                continue
            out[f.name] = _hashable(value)
        return out
    if isinstance(v, (list, tuple)):
        return [_hashable(x) for x in v]
    if isinstance(v, dict):
        return {k: _hashable(x) for k, x in v.items()}
    return v
