"""The ``trap2`` command: a thin shell over library calls (parse → validate → one call).

Thread policy is set before torch loads: with OpenMP's default spin-waiting, a busy machine can slow a
step many times over, so workers sleep (``OMP_WAIT_POLICY=PASSIVE``) and ``--threads`` is explicit.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints  # noqa: E402

import typer  # noqa: E402

from trap2.errors import Trap2Error, UnknownNameError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trap²: updates that break when merged.")

Threads = Annotated[
    int,
    typer.Option(help="torch intra-op threads (default: $OMP_NUM_THREADS if set, else min(2, CPU count))"),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML config file (CLI options override it)")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="where training and evaluation run: cpu, cuda, cuda:N or auto")
]
# a model folder and data files instead of a suite (trap2 audit / bench --base)
BaseOpt = Annotated[
    Path | None,
    typer.Option(help="a Hugging Face model folder: audit/bench on it with --task NAME=ADAPTER_DIR:DATA"),
]
ScoringOpt = Annotated[
    str,
    typer.Option(help="with --base, causal LMs: loglik (answer log-likelihood), exact (generation) or auto"),
]
BatchOpt = Annotated[int, typer.Option(help="with --base: batch size of the suite's feature and eval passes")]
MaxLenOpt = Annotated[
    int,
    typer.Option(
        help="with --base: tokens per text (cut to it) or per prompt + answer (a longer one is refused)"
    ),
]


def _threads(n: int | None) -> None:
    import torch

    if not n or n < 1:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)


# --- the objective's options, one per ObjectiveConfig field ----------------------------------------

_OBJECTIVE_FLAGS = {"name": "objective"}  # the CLI's spelling of a field, where it is not the field's


def objective_flags() -> dict[str, str]:
    """{ObjectiveConfig field: its option}: ``--objective`` for ``name``, else ``--s-min`` for ``s_min``."""
    from trap2.config import ObjectiveConfig

    return {
        f.name: "--" + _OBJECTIVE_FLAGS.get(f.name, f.name).replace("_", "-")
        for f in dataclasses.fields(ObjectiveConfig)
    }


def objective_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` one option per :class:`ObjectiveConfig` field, typed and documented by the field.

    The command declares ``objective: dict[str, Any]`` where the options go in its ``--help``; it
    receives {field: value given}, the options left out being absent. A field added to the config
    becomes an option by itself.
    """
    from rich.markup import escape

    from trap2.config import ObjectiveConfig

    hints = get_type_hints(ObjectiveConfig)
    sig = inspect.signature(command, eval_str=True)
    names = list(sig.parameters)
    at = names.index("objective")
    others = [p for p in sig.parameters.values() if p.name != "objective"]
    taken = {p.name for p in others} | {flag for p in others for flag in _flags(p)}
    generated, flags = [], objective_flags()
    for f in dataclasses.fields(ObjectiveConfig):
        tp = hints[f.name]
        if get_origin(tp) in (Union, types.UnionType):
            (tp,) = [a for a in get_args(tp) if a is not type(None)]
        if tp not in (str, int, float, bool):
            raise TypeError(f"objective.{f.name}: no CLI option for type {tp}")
        param, flag = f"objective_{f.name}", flags[f.name]
        if param in taken or flag in taken:
            raise TypeError(f"{command.__name__}: {flag} is both an option and objective.{f.name}")
        help_text = escape(f.metadata["help"])  # typer renders rich markup: "[s_min, 1−δ]" is text
        option = typer.Option(flag, help=help_text, show_default=False)
        generated.append(
            inspect.Parameter(
                param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, option]
            )
        )

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {f.name: kwargs.pop(f"objective_{f.name}") for f in dataclasses.fields(ObjectiveConfig)}
        return command(*args, objective={k: v for k, v in given.items() if v is not None}, **kwargs)

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    params = own[:at] + generated + own[at + 1 :]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _flags(param: inspect.Parameter) -> list[str]:
    """The options a typer parameter declares: its explicit ones, or the one typer derives from its name."""
    explicit = []
    for info in getattr(param.annotation, "__metadata__", ()):  # in Annotated, the first name is `default`
        explicit += [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
    flags = [d for d in explicit if isinstance(d, str) and d.startswith("-")]
    return flags or ["--" + param.name.replace("_", "-")]


def _train_config(base: dict[str, Any], objective: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """TrainConfig from ``base`` (the YAML's ``train``), the objective options given and the other
    options given (None = not given)."""
    from trap2.config import TrainConfig, from_dict

    data = dict(base)
    data["objective"] = {**data.get("objective", {}), **(objective or {})}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(TrainConfig, data)


@app.command()
@objective_options
def train(
    out: Annotated[Path, typer.Option(help="folder for the released update")],
    suite: Annotated[str | None, typer.Option(help="suite (default: digits)")] = None,
    task: Annotated[
        str | None, typer.Option(help="task of the suite (default: the suite's default target)")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="'lora' or 'full'")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    # --objective, --lam, --s-min, ...: one option per ObjectiveConfig field (objective_options)
    objective: dict[str, Any] | None = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="save the training state every N steps to OUT.checkpoint")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT.checkpoint")] = False,
    config: ConfigOpt = None,
    threads: Threads = 0,
) -> None:
    """Fine-tune one task of a suite (protected with Trap² by default) and save the update."""
    from trap2.config import load_yaml
    from trap2.eval import accuracy, base_state, scaling_curve
    from trap2.suites import get_suite
    from trap2.training import train_update
    from trap2.training.loop import resolve_device
    from trap2.updates import apply_delta

    _threads(threads)
    raw = load_yaml(config) if config else {}
    unknown = sorted(set(raw) - {"suite", "task", "train"})
    if unknown:
        raise Trap2Error(
            f"{config}: unknown top-level key(s) {', '.join(unknown)}; valid: suite, task, train"
        )
    cfg = _train_config(
        raw.get("train", {}),
        objective,
        mode=mode,
        steps=steps,
        lr=lr,
        seed=seed,
        device=device,
        checkpoint_every=checkpoint_every,
    )
    st = get_suite(suite or raw.get("suite", "digits"))
    task_name = task or raw.get("task") or st.default_target
    st.task(task_name)
    ckpt = out.with_name(out.name + ".checkpoint")
    result = train_update(
        st,
        task_name,
        cfg,
        lambda step, row: typer.echo(
            f"step {step:>5}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
        ),
        checkpoint_dir=ckpt if (cfg.checkpoint_every or resume) else None,
        resume=resume,
    )

    result.update.save(out, peft_model=result.peft_model)
    shutil.rmtree(ckpt, ignore_errors=True)  # the finished update replaces the checkpoint
    backbone = st.make_backbone().to(resolve_device(cfg.device))
    w0, d = base_state(backbone), result.update.dense()
    test = accuracy(backbone, st.task(task_name), "test", apply_delta(w0, d, 1.0))
    curve = scaling_curve(backbone, st.task(task_name), d, (0.5, 1.0, 2.0))
    typer.echo(
        f"saved {out}  test acc {test:.3f}  acc(s=0.5/1/2) "
        + "/".join(f"{a:.3f}" for a in curve)
        + (f"  skipped non-finite steps {result.skipped_steps}" if result.skipped_steps else "")
    )


# the attacker grid (docs/threats.md): recovery, un-trapping and distillation over lr × steps × samples × ...
ThreatsOpt = Annotated[
    str | None,
    typer.Option(
        help="also run the attacker grid: 'quick', 'full' or 'none' (docs/threats.md); default none"
    ),
]
BenchThreatsOpt = Annotated[
    str | None,
    typer.Option(
        help="the attacker grid of every cell: 'full' (the default, hours), 'quick', or 'none' for the attack "
        "matrix alone (docs/threats.md)"
    ),
]


@app.command()
@objective_options
def demo(
    out: Annotated[
        Path, typer.Option(help="output folder (report.json, report.md, scaling_curve.png, updates/)")
    ],
    suite: Annotated[str | None, typer.Option(help="suite (default: digits)")] = None,
    target: Annotated[str | None, typer.Option(help="task to protect (default: the suite's)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps of every run")] = None,
    mode: Annotated[str | None, typer.Option(help="'lora' or 'full'")] = None,
    # --objective, --lam, --s-min, ...: one option per ObjectiveConfig field (objective_options)
    objective: dict[str, Any] | None = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: DeviceOpt = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="retrain and recompute instead of reusing cached updates and cells"),
    ] = False,
    config: ConfigOpt = None,
    threads: Threads = 0,
    threats: ThreatsOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            help="processes for the trainings and the attack matrix, one thread each "
            "(default: 2 with --threads 2 or more on the CPU, else 1)"
        ),
    ] = 0,
) -> None:
    """The main job: 8 plain updates + a protected one, standalone, scaling curve and merges."""
    from trap2.demo import default_workers, run_demo
    from trap2.progress import cli_reporter

    _threads(threads)
    cfg = _demo_config(
        config, objective, suite=suite, target=target, steps=steps, mode=mode, seed=seed, device=device,
        threats=threats,
    )  # fmt: skip
    with cli_reporter() as reporter:
        report = run_demo(cfg, out, fresh=fresh, reporter=reporter, workers=workers or default_workers(cfg))
    _print_summary(report, f"trap2 demo: suite {report['suite']}, protected task {report['target']}", out)


def _demo_config(config: Path | None, objective: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """DemoConfig from its defaults, the YAML ``config``, the objective options given and the other CLI
    ``overrides`` (None = not given)."""
    from trap2.config import from_dict, load_yaml, to_dict
    from trap2.pipeline import DemoConfig

    raw = load_yaml(config) if config else {}
    base = to_dict(DemoConfig())
    base.update({k: v for k, v in raw.items() if k != "train"})
    train_keys = ("steps", "mode", "seed", "device")
    train_cfg = _train_config(
        {**base["train"], **raw.get("train", {})}, objective, **{k: overrides.get(k) for k in train_keys}
    )
    for k, v in overrides.items():
        if k not in train_keys and v is not None:
            base[k] = v
    base["train"] = dataclasses.asdict(train_cfg)
    return from_dict(DemoConfig, base)


def _print_summary(report: dict[str, Any], title: str, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from trap2.demo import summary_rows

    console = Console()
    table = Table(title=f"{title} (accuracy %)")
    for col in ("", "unprotected", "Trap²"):
        table.add_column(col, justify="right" if col else "left")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {out / 'report.md'}  ({report['wall_seconds']:.0f} s)")


@app.command()
def audit(
    update: Annotated[
        Path | None,
        typer.Argument(
            help="the released update: a PEFT folder or a delta.safetensors folder (with --base: default "
            "the --protected task's adapter)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder (report.json, report.md, PNGs, updates/)")] = Path(
        "runs/audit"
    ),
    suite: Annotated[
        str | None,
        typer.Option(help="suite the update was made on: name or package.module:function (default: digits)"),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            help="with --suite: the update's task (default: recorded in it); with --base: "
            "NAME=ADAPTER_DIR:DATA per task (repeatable; ADAPTER_DIR may be empty)"
        ),
    ] = None,
    base: BaseOpt = None,
    protected: Annotated[
        str | None, typer.Option(help="with --base: the task whose adapter is audited")
    ] = None,
    pool: Annotated[
        list[Path] | None,
        typer.Option(
            help="another task's update to merge with (repeatable); missing tasks: the suite's plain updates"
        ),
    ] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated merge methods (default: all)")] = None,
    spaces: Annotated[
        str | None, typer.Option(help="comma-separated merge spaces (default: full,knots,core)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps of the pool's plain updates")] = None,
    mode: Annotated[str | None, typer.Option(help="'lora' or 'full' for the pool's plain updates")] = None,
    scoring: ScoringOpt = "auto",
    seed: Annotated[
        int | None,
        typer.Option(help="random seed of the plain updates (and, with --base, of the data carving)"),
    ] = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 64,
    max_len: MaxLenOpt = 128,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="retrain the pool and recompute every cell instead of resuming")
    ] = False,
    config: ConfigOpt = None,
    threads: Threads = 0,
    threats: ThreatsOpt = None,
) -> None:
    """How well is a released update protected: standalone, scaling curve, attack matrix and heat map.

    On your own model and data:  trap2 audit --base MODEL_DIR --task a=ADAPTER_A:a.jsonl
    --task b=ADAPTER_B:b.jsonl --protected a --out runs/audit"""
    from trap2.audit import run_audit
    from trap2.files_job import FilesOptions, run_files_audit
    from trap2.progress import cli_reporter

    _threads(threads)
    cfg = _demo_config(
        config,
        suite=suite,
        steps=steps,
        mode=mode,
        seed=seed,
        device=device,
        methods=_csv(methods),
        spaces=_csv(spaces),
        threats=threats,
    )
    tasks = task or []
    if base is not None:
        if suite is not None or pool:
            raise UnknownNameError("--base makes the suite from files: give --task specs, not --suite/--pool")
        options = FilesOptions(scoring, seed or 0, batch_size, device or "cpu", max_len)
        with cli_reporter() as reporter:
            report = run_files_audit(
                base, tasks, cfg, out, protected=protected, update=update, options=options,
                fresh=fresh, reporter=reporter,
            )  # fmt: skip
        title = f"trap2 audit: {report['audited']} ({base}/{report['target']})"
    else:
        if update is None:
            raise UnknownNameError("give the update to audit, or --base with --task NAME=ADAPTER_DIR:DATA")
        if len(tasks) > 1 or protected is not None:
            raise UnknownNameError("several --task specs and --protected need --base MODEL_DIR")
        with cli_reporter() as reporter:
            report = run_audit(
                update, cfg, out, task=tasks[0] if tasks else None, pool=pool or (), fresh=fresh,
                reporter=reporter,
            )  # fmt: skip
        title = f"trap2 audit: {update} ({report['suite']}/{report['target']})"
    _print_summary(report, title, out)


def _csv(v: str | None) -> list[str] | None:
    return None if v is None else [x.strip() for x in v.split(",") if x.strip()]


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="output folder (bench.md/json, <mode>/<target>/, updates/)")],
    suite: Annotated[
        str | None, typer.Option(help="suite: a name or package.module:function (default: digits)")
    ] = None,
    modes: Annotated[str | None, typer.Option(help="comma-separated: lora,full (default: both)")] = None,
    targets: Annotated[
        str | None,
        typer.Option(help="comma-separated tasks protected in turn, or 'all' (default: the suite's target)"),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="comma-separated tasks fine-tuned and merged (default: all the suite's)"),
    ] = None,
    base: BaseOpt = None,
    task: Annotated[
        list[str] | None,
        typer.Option(help="with --base: NAME=ADAPTER_DIR:DATA per task (repeatable; ADAPTER_DIR: optional)"),
    ] = None,
    protected: Annotated[str | None, typer.Option(help="the task protected (same as --targets NAME)")] = None,
    methods: Annotated[
        str | None, typer.Option(help="comma-separated merge methods (default: ta,ties,tsv,cart)")
    ] = None,
    spaces: Annotated[str | None, typer.Option(help="comma-separated merge spaces (default: full)")] = None,
    scoring: ScoringOpt = "auto",
    seed: Annotated[int, typer.Option(help="with --base: seed of the validation/test carving")] = 0,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 64,
    max_len: MaxLenOpt = 128,
    fresh: Annotated[bool, typer.Option("--fresh", help="redo every cell and retrain every update")] = False,
    equal_steps: Annotated[
        bool,
        typer.Option(
            "--equal-steps",
            help="also train each target's plain update for its protected run's steps and report it beside",
        ),
    ] = False,
    config: ConfigOpt = None,
    threads: Threads = 0,
    threats: BenchThreatsOpt = None,
) -> None:
    """The paper's experiment on a suite: LoRA and full, unprotected vs protected, the whole matrix.

    Resumable: finished cells and trained updates are reused; an interrupted training run resumes from
    its last checkpoint. With --base, the given adapters are the unprotected pool."""
    from trap2.bench import BenchConfig, run_bench
    from trap2.config import from_dict, load_yaml
    from trap2.files_job import FilesOptions, run_files_bench
    from trap2.progress import cli_reporter

    _threads(threads)
    if protected is not None and targets is not None:
        raise UnknownNameError("give --protected or --targets, not both")
    raw = load_yaml(config) if config else {}
    given = {"suite": suite, "modes": _csv(modes), "targets": _csv(protected or targets)}
    given.update(tasks=_csv(tasks), methods=_csv(methods), spaces=_csv(spaces), device=device)
    given["threats"] = threats
    given["equal_steps"] = True if equal_steps else None
    raw.update({k: v for k, v in given.items() if v is not None})
    cfg = from_dict(BenchConfig, raw, "bench")
    with cli_reporter() as reporter:
        if base is not None:
            if suite is not None:
                raise UnknownNameError("--base builds the suite from files: give --task specs, not --suite")
            options = FilesOptions(scoring, seed, batch_size, device or "cpu", max_len)
            summary = run_files_bench(
                base, task or [], cfg, out, options=options, fresh=fresh, reporter=reporter
            )
        else:
            if task:
                raise UnknownNameError("--task NAME=ADAPTER_DIR:DATA needs --base MODEL_DIR")
            summary = run_bench(cfg, out, fresh=fresh, reporter=reporter)
    typer.echo((out / "bench.md").read_text())
    typer.echo(f"bench: {out / 'bench.md'}  ({summary['wall_seconds_this_run']:.0f} s this run)")


@app.command()
def merge(
    updates: Annotated[
        list[Path], typer.Argument(help="update folders (PEFT adapters or dense) or .safetensors")
    ],
    base: Annotated[
        str, typer.Option(help="the base: a suite name (its backbone) or a checkpoint .safetensors")
    ],
    out: Annotated[
        Path, typer.Option(help="output folder: a PEFT adapter if low-rank, else delta.safetensors")
    ],
    method: Annotated[str, typer.Option(help="merge method (see `trap2 methods`)")] = "ta",
    space: Annotated[str, typer.Option(help="merge space: full, knots or core")] = "full",
    coefficient: Annotated[float | None, typer.Option(help="global coefficient c (default 1)")] = None,
    search: Annotated[str | None, typer.Option(help="search c on this suite's validation split")] = None,
    hparam: Annotated[
        list[str] | None, typer.Option(help="method hyperparameter KEY=VALUE (repeatable)")
    ] = None,
    merged_checkpoint: Annotated[
        bool, typer.Option("--merged-checkpoint", help="also write W0 + c·ΔW as model.safetensors")
    ] = False,
    device: DeviceOpt = None,
    threads: Threads = 0,
) -> None:
    """Merge updates (method × space), with a given or searched coefficient, and write the result."""
    from trap2.merge_job import merge_files, parse_hparams

    _threads(threads)
    hparams = parse_hparams(hparam or [])
    r = merge_files(
        updates, base, method, space, out, coefficient, search, hparams, merged_checkpoint, device or "cpu"
    )
    kind = "PEFT adapter" if r.update.kind == "lora" else "dense delta"
    typer.echo(
        f"merged {len(updates)} updates with {method} in {space} space, c = {r.coefficient:g} -> {out} ({kind})"
    )
    if r.search:
        accs = "  ".join(f"{t} {a:.3f}" for t, a in r.search["test_acc"].items())
        typer.echo(f"searched on {r.search['suite']} ({r.search['points']} points); test accuracy: {accs}")


@app.command()
@objective_options
def protect(
    update: Annotated[
        Path, typer.Argument(help="the update to protect: a PEFT adapter folder or a dense delta")
    ],
    out: Annotated[Path, typer.Option(help="folder for the protected update (same format as the given one)")],
    suite: Annotated[
        str | None,
        typer.Option(help="suite the update was made on: name or package.module:function (default: digits)"),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="the update's task (default: recorded in it); with --base: NAME=:DATA, the task's data file"
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="a Hugging Face model folder the update was made on (with --task NAME=:DATA)"),
    ] = None,
    inputs: Annotated[
        str,
        typer.Option(
            help="unlabelled inputs: 'train' or 'val' (the task's split, labels dropped) or a .safetensors file"
        ),
    ] = "train",
    targets: Annotated[
        str | None,
        typer.Option(help="'teacher' (self-distillation, no labels) or 'labels' (trap2 from the update)"),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps of the protect phase")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="mini-batch size")] = None,
    # --lam, --s-min, --law, --collateral, ...: one option per ObjectiveConfig field (objective_options)
    objective: dict[str, Any] | None = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: DeviceOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="protect an update that already carries Trap² settings again")
    ] = False,
    config: ConfigOpt = None,
    threads: Threads = 0,
) -> None:
    """Protect an update you already have: self-distillation from its own predictions, no labels needed."""
    from trap2.config import from_dict, load_yaml, to_dict
    from trap2.protect import ProtectConfig, load_inputs, protect_update
    from trap2.suites import get_suite
    from trap2.updates import load_update

    _threads(threads)
    raw = load_yaml(config) if config else {}
    unknown = sorted(set(raw) - {"suite", "task", "protect"})
    if unknown:
        raise Trap2Error(
            f"{config}: unknown top-level key(s) {', '.join(unknown)}; valid: suite, task, protect"
        )
    data = {**to_dict(ProtectConfig()), **raw.get("protect", {})}
    if targets is not None:
        data["targets"] = targets
    train = _train_config(
        data["train"], objective, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device
    )
    data["train"] = dataclasses.asdict(train)
    cfg = from_dict(ProtectConfig, data, "protect")
    given = load_update(update)
    if base is not None:  # a suite of one task from a model folder and its data file (trap2 audit --base's)
        from trap2.files_job import FilesOptions, build_suite, parse_task

        if suite is not None or task is None:
            raise UnknownNameError("--base takes the task from --task NAME=:DATA, not --suite")
        spec = parse_task(task)
        st, task_name = (
            build_suite(base, [spec], FilesOptions(seed=seed or 0, device=device or "cpu")),
            spec.name,
        )
    else:
        st = get_suite(suite or raw.get("suite", "digits"))
        task_name = task or raw.get("task") or given.meta.get("task")
    x = None if inputs == "train" or task_name is None else load_inputs(inputs, st.task(task_name))
    result = protect_update(
        st, given, cfg, inputs=x, task=task_name, force=force, where=str(update),
        progress=lambda step, row: typer.echo(f"step {step:>5}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")),
    )  # fmt: skip
    result.update.save(out, peft_model=result.peft_model)
    typer.echo(
        f"saved {out}  agreement with the original {100 * result.agreement:.1f}%  test acc "
        f"{100 * result.acc_teacher:.1f}% -> {100 * result.acc_protected:.1f}%  (audit it: trap2 audit {out})"
    )


@app.command()
def report(
    results: Annotated[
        list[Path] | None, typer.Argument(help="result JSON files (report.json, bench.json, results/*.json)")
    ] = None,
    table: Annotated[
        str | None, typer.Option(help="render only this table of each result (default: all of them)")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="output format: md (markdown)")] = "md",
    update_docs: Annotated[
        bool,
        typer.Option(
            "--update-docs",
            help="re-render every <!-- trap2-report FILE [TABLE] --> block of README.md and docs/*.md",
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="with --update-docs: change nothing, exit 1 if a block is stale")
    ] = False,
    root: Annotated[Path, typer.Option(help="with --update-docs: the repository root")] = Path("."),
) -> None:
    """Render a result file's tables as markdown (dispatch on its "kind"), or the docs' marked tables."""
    from trap2.eval.report import read_result, render, render_docs

    if format != "md":
        raise UnknownNameError(f"--format {format!r}: the only format is md")
    if update_docs:
        if results:
            raise UnknownNameError("--update-docs renders the docs' own markers: give no result files")
        changed = render_docs(root, write=not check)
        for f in changed:
            typer.echo(f"{'stale' if check else 'rewrote'}: {f}")
        if check and changed:
            raise typer.Exit(1)
        return
    if not results:
        raise UnknownNameError("give a result JSON file (or --update-docs)")
    for i, path in enumerate(results):
        if len(results) > 1:
            typer.echo(("\n" if i else "") + f"<!-- {path} -->")
        typer.echo(render(read_result(path), table, where=str(path)), nl=False)


@app.command()
def objectives() -> None:
    """List the registered training objectives."""
    from trap2.objectives import OBJECTIVES
    from trap2.objectives.operators import OPERATORS

    for name in OBJECTIVES:
        doc = (sys.modules[OBJECTIVES.get(name).__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:8} {doc}")
    typer.echo("\noff-nominal operators of trap2 (--operators a,b,...; docs/hardening.md):")
    for name in OPERATORS.registered():
        op = OPERATORS.get(name)
        typer.echo(f"{name:12} {op.summary} (stands for {op.stands_for})")


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List the registered merge methods and spaces with their hyperparameters and references."""
    from trap2.attacks.searches.base import DATA_METHOD_INFO
    from trap2.merging import INTERNAL_HPARAMS, METHODS, SPACES

    rows = []
    for name in METHODS:
        m = METHODS.get(name)
        hp = {
            k: {
                "default": h.default,
                "valid": h.valid,
                "help": h.help,
                "grid": list(h.grid),
                "searched": h.searched,
            }
            for k, h in m.hparams.items()
            if k not in INTERNAL_HPARAMS
        }
        rows.append({"name": name, "summary": m.summary, "reference": m.reference, "hparams": hp})
    for name, (summary, reference) in DATA_METHOD_INFO.items():  # attack-only: they need the suite's data
        rows.append({"name": name, "summary": summary, "reference": reference, "hparams": {}, "data": True})
    if as_json:
        typer.echo(json.dumps({"methods": rows, "spaces": SPACES.names()}, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:10} {r['summary']}  [{r['reference']}]")
        for k, h in r["hparams"].items():
            walked = "; every attack searches " + str(h["grid"]) if h["searched"] else ""
            typer.echo(f"           {k} = {h['default']!r} ({h['valid']}): {h['help']}{walked}")
    typer.echo("spaces (any method in any space): full = dense ΔW; knots = SVD of the column-stacked deltas;")
    typer.echo("  core = LoRA only, bases of the stacked A's and B's")


data_app = typer.Typer(no_args_is_help=True, help="Prepare a suite's real datasets into the local cache.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    suite: Annotated[
        str, typer.Argument(help="suite whose data to prepare: vision-cnn, text-transformer, clip8, math")
    ],
    bigbench: Annotated[
        Path | None,
        typer.Option(
            help="the bigbench-1.0.0 sdist, or its folder (default: $TRAP2_BIGBENCH or CACHE/bigbench)"
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(help="fetch the BIG-bench sdist with `pip download` (a package registry) if absent"),
    ] = False,
    root: Annotated[
        Path | None,
        typer.Option(
            help="clip8 / math: the local data folder (default: $TRAP2_CLIP8_DATA / $TRAP2_MATH_DATA)"
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="clip8 / math: the local model folder (default: $TRAP2_CLIP_MODEL / $TRAP2_MATH_MODEL)"
        ),
    ] = None,
) -> None:
    """Read each task's source once and write fixed train/val/test subsets to the cache ($TRAP2_DATA)."""
    from trap2.data import sources
    from trap2.data.prepare import bigbench_source, data_dir
    from trap2.suites import clip8, math_lm, text_transformer, vision_cnn

    bigbench_suites = {"vision-cnn": vision_cnn.prepare, "text-transformer": text_transformer.prepare}
    local_suites = {"clip8": clip8.prepare, "math": math_lm.prepare}
    if suite in local_suites:
        paths = local_suites[suite](root, model=model)
    elif suite in bigbench_suites:
        bb = bigbench or bigbench_source()
        if download and not (bb / sources.BIGBENCH_SDIST).exists() and not bb.is_file():
            bb.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(bb)]
            typer.echo("$ " + " ".join(cmd))
            subprocess.run(cmd, check=True)
        paths = bigbench_suites[suite](bb)
    else:
        valid = ", ".join([*bigbench_suites, *local_suites])
        raise UnknownNameError(f"no data to prepare for suite {suite!r}; valid: {valid}")
    for path in paths:
        typer.echo(f"wrote {path}")
    typer.echo(f"cache: {data_dir() / suite}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except Trap2Error as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, typer.Abort) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except Exception as e:  # usage errors (typer's own click copy, or click) print themselves
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()
