"""Reports: ``report.json``, ``report.md``, the scaling-curve PNG and a heat map of the merged accuracy
(method × space, unprotected vs protected); and the renderers behind ``trap2 report``.

Every result JSON names what it is (top-level ``kind``) and how it was made (``command``, ``version``,
``threads``, ``machine``, ``wall_seconds``: :func:`provenance`). ``trap2 report FILE.json`` renders its
tables through the renderer registered for its kind (``@renderer("demo")``: a function from the JSON to
``{table name: markdown}``). The docs' tables are that output between markers,

    <!-- trap2-report results/NAME.json [TABLE] -->
    ...
    <!-- /trap2-report -->

which :func:`render_docs` re-renders (``trap2 report --update-docs``; ``tests/test_docs_tables.py``
fails when a marked table differs from its JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from trap2.config import ObjectiveConfig
from trap2.errors import ConfigError, DataError
from trap2.io import atomic_path, write_json, write_text

Tables = dict[str, str]  # {table name: markdown}, in display order
RENDERERS: dict[str, Callable[[Mapping[str, Any]], Tables]] = {}


def renderer(
    kind: str,
) -> Callable[[Callable[[Mapping[str, Any]], Tables]], Callable[[Mapping[str, Any]], Tables]]:
    """Register ``fn(result) -> {table name: markdown}`` as the renderer of result files of ``kind``."""

    def register(fn: Callable[[Mapping[str, Any]], Tables]) -> Callable[[Mapping[str, Any]], Tables]:
        if kind in RENDERERS:
            raise ConfigError(f"a renderer for result kind {kind!r} is already registered")
        RENDERERS[kind] = fn
        return fn

    return register


def machine() -> str:
    """The machine a result was measured on, in words: CPU model and count, OS, and the GPU if one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    words = f"{n}-core CPU ({cpu}), {platform.system()}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        words += f", GPU {torch.cuda.get_device_name(0)}"
    return words


def provenance(kind: str, wall_seconds: float | None = None) -> dict[str, Any]:
    """The keys every published result carries: what it is, the command, version, threads and machine."""
    from trap2 import __version__

    torch = sys.modules.get("torch")
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else ""
    command = shlex.join(["trap2", *argv[1:]] if prog in ("trap2", "cli.py", "__main__.py") else argv)
    out: dict[str, Any] = {
        "kind": kind,
        "command": command,
        "version": __version__,
        "threads": torch.get_num_threads() if torch is not None else None,
        "machine": machine(),
    }
    if wall_seconds is not None:
        out["wall_seconds"] = wall_seconds
    return out


def result_kind(result: Mapping[str, Any], where: str = "result") -> str:
    kind = result.get("kind")
    if kind is None:  # reports written before results named their kind
        kind = "audit" if "audited" in result else "demo" if "attacks" in result else None
    if kind not in RENDERERS:
        raise DataError(
            f"{where}: no renderer for result kind {kind!r}; known kinds: {', '.join(sorted(RENDERERS))}"
        )
    return kind


def render_tables(result: Mapping[str, Any], where: str = "result") -> Tables:
    """Every table of a result JSON, by the renderer registered for its ``kind``."""
    return RENDERERS[result_kind(result, where)](result)


def render(result: Mapping[str, Any], table: str | None = None, where: str = "result") -> str:
    """One table of a result (``table``), or all of them, as markdown."""
    tables = render_tables(result, where)
    if table is None:
        return "\n\n".join(t.strip("\n") for t in tables.values()) + "\n"
    if table not in tables:
        raise ConfigError(f"{where}: no table {table!r}; tables of this result: {', '.join(tables)}")
    return tables[table].strip("\n") + "\n"


def read_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: no such result file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a readable JSON result ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: a result file holds a JSON object")
    return data


# --- the docs' marked tables ----------------------------------------------------------------------

MARKER = re.compile(
    r"(?P<open><!-- trap2-report (?P<path>\S+?\.json)(?: (?P<table>[\w.-]+))? -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /trap2-report -->)",
    re.S,
)


def doc_files(root: str | Path) -> list[Path]:
    """The files whose marked tables are rendered: README.md and docs/*.md."""
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def render_doc(text: str, root: str | Path, where: str = "doc") -> str:
    """``text`` with every marked block replaced by its table rendered from the JSON (paths from ``root``)."""
    root = Path(root)

    def sub(m: re.Match[str]) -> str:
        path = root / m["path"]
        body = render(read_result(path), m["table"], where=f"{where}: {m['path']}")
        return f"{m['open']}{body}{m['close']}"

    return MARKER.sub(sub, text)


def render_docs(root: str | Path, files: Iterable[Path] | None = None, write: bool = False) -> list[Path]:
    """The doc files whose marked tables differ from their JSON; ``write=True`` rewrites them in place."""
    changed = []
    for f in files if files is not None else doc_files(root):
        text = f.read_text(encoding="utf-8")
        new = render_doc(text, root, where=str(f))
        if new != text:
            changed.append(f)
            if write:
                write_text(f, new)
    return changed


def pct(acc: float | None) -> str:
    return "–" if acc is None else f"{100 * acc:.1f}"


METHOD_NAMES = {"ta": "TA", "ties": "TIES", "dare_ties": "DARE+TIES", "dare": "DARE", "tsv": "TSV"}
METHOD_NAMES |= {"cart": "CART", "regmean": "RegMean"}


def summary_rows(
    report: Mapping[str, Any], spaces: Iterable[str] | None = None
) -> list[tuple[str, str, str]]:
    """(what, unprotected, Trap²) rows: the target standalone and at s = 0.5 / 2, then each attack cell
    (``spaces``: only cells in these merge spaces) as target / mean, then the zero-shot mean."""
    t = report["target"]
    curve = report["scaling_curve"]

    def at(s: float, key: str) -> str:
        return pct(curve[key][curve["s"].index(s)]) if s in curve["s"] else "–"

    rows = [
        (
            f"standalone `{t}`",
            pct(report["standalone"]["unprotected"][t]),
            pct(report["standalone"]["protected"][t]),
        ),
        (f"`{t}` at s = 0.5", at(0.5, "unprotected"), at(0.5, "protected")),
        (f"`{t}` at s = 2", at(2.0, "unprotected"), at(2.0, "protected")),
    ]
    n = len(report["tasks"])
    keep = None if spaces is None else set(spaces)
    for cell in dict.fromkeys((a["method"], a["space"], a["search"]) for a in report["attacks"]):
        if keep is not None and cell[1] not in keep:
            continue
        pair = {
            a["protected"]: a for a in report["attacks"] if (a["method"], a["space"], a["search"]) == cell
        }
        if set(pair) != {False, True}:
            continue
        label = " ".join(
            x
            for x in (
                METHOD_NAMES.get(cell[0], cell[0]),
                cell[1] if cell[0] != "ta" and cell[1] != "full" else "",
                cell[2] if cell[2] != "global" else "",
            )
            if x
        )
        rows.append(
            (
                f"{label}: `{t}` / mean of {n}",
                f"{pct(pair[False]['acc'][t])} / {pct(pair[False]['acc']['mean'])}",
                f"{pct(pair[True]['acc'][t])} / {pct(pair[True]['acc']['mean'])}",
            )
        )
    rows.append((f"zero-shot mean of {n}", pct(report["zero_shot"]["mean"]), ""))
    return rows


def _table(head: list[str], rows: Iterable[Iterable[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(report: Mapping[str, Any]) -> str:
    """The demo at a glance: target standalone, its curve at s = 0.5 and 2, full-space merges."""
    return _table(["", "unprotected", "Trap²"], summary_rows(report, spaces=("full",)))


def standalone_table(report: Mapping[str, Any]) -> str:
    tasks = report["tasks"]
    zs, ft = report["zero_shot"], report["standalone"]["unprotected"]
    prot = report["standalone"]["protected"]
    return _table(
        ["", *tasks, "mean"],
        [
            ["zero-shot", *(pct(zs[t]) for t in tasks), pct(zs["mean"])],
            ["fine-tuned", *(pct(ft[t]) for t in tasks), pct(ft["mean"])],
            ["Trap²", *(pct(prot.get(t)) for t in tasks), ""],
        ],
    )


def curve_table(report: Mapping[str, Any]) -> str:
    curve = report["scaling_curve"]
    return _table(
        ["s", *(f"{s:g}" for s in curve["s"])],
        [
            ["unprotected", *(pct(a) for a in curve["unprotected"])],
            ["Trap²", *(pct(a) for a in curve["protected"])],
        ],
    )


def merges_table(report: Mapping[str, Any]) -> str:
    target, zs = report["target"], report["zero_shot"]
    rows = []
    for a in report["attacks"]:
        pool = "with Trap²" if a["protected"] else "unprotected"
        coef = (
            f"{a['coefficient']:g}"
            if a["search"] == "global"
            else "/".join(f"{c:g}" for c in a["coefficients"])
        )
        verdict = "above" if a["acc"]["mean"] > zs["mean"] else "below"
        hp = ", ".join(f"{k}={v}" for k, v in a["hparams"].items())
        method = a["method"] + (f" ({hp})" if hp else "")
        rows.append(
            [
                method,
                a["space"],
                a["search"],
                pool,
                coef,
                pct(a["acc"][target]),
                pct(a["acc"]["mean"]),
                verdict,
            ]
        )
    head = ["method", "space", "search", "pool", "c", target, "mean", f"vs zero-shot mean {pct(zs['mean'])}"]
    return _table(head, rows)


def matrix_table(report: Mapping[str, Any]) -> str:
    """Mean merged accuracy of the global search, a column per method, its spaces side by side
    (e.g. ``F / K / C`` for full / KnOTS / Core); rows unprotected and with Trap²."""
    cells = [a for a in report["attacks"] if a["search"] == "global"]
    if not cells:
        return ""
    methods = list(dict.fromkeys(a["method"] for a in cells))
    spaces = {m: list(dict.fromkeys(a["space"] for a in cells if a["method"] == m)) for m in methods}
    acc = {(a["method"], a["space"], a["protected"]): a["acc"]["mean"] for a in cells}
    letters = {"full": "F", "knots": "K", "core": "C"}

    def head(m: str) -> str:
        name = METHOD_NAMES.get(m, m)
        if len(spaces[m]) == 1:
            return name
        return f"{name} {' / '.join(letters.get(sp, sp) for sp in spaces[m])}"

    rows = [
        [label, *(" / ".join(pct(acc.get((m, sp, prot))) for sp in spaces[m]) for m in methods)]
        for prot, label in ((False, "unprotected"), (True, "with Trap²"))
    ]
    return _table(["pool", *(head(m) for m in methods)], rows)


@renderer("demo")
def demo_tables(report: Mapping[str, Any]) -> Tables:
    """``trap2 demo``'s report.json (and each cell of ``trap2 bench``): summary, standalone, curve,
    merges, matrix (method × space) and, when there are any, threats."""
    tables = {
        "summary": summary_table(report),
        "standalone": standalone_table(report),
        "curve": curve_table(report),
        "merges": merges_table(report),
    }
    matrix = matrix_table(report)
    if matrix:
        tables["matrix"] = matrix
    threats = threats_table(dict(report))
    if threats:
        tables["threats"] = "\n".join(threats[2:]).strip("\n")
    return tables


@renderer("audit")
def audit_tables(report: Mapping[str, Any]) -> Tables:
    """``trap2 audit``'s report.json: the demo's tables, for the audited update."""
    return demo_tables(report)


@renderer("bench")
def bench_tables(summary: Mapping[str, Any]) -> Tables:
    """``trap2 bench``'s bench.json: one table per mode (``lora``, ``full``), a row per protected target;
    ``<mode>-<target>-threats`` for cells with stronger threats."""
    from trap2.bench import bench_mode_tables

    return bench_mode_tables(summary)


@renderer("threats")
def threats_tables(result: Mapping[str, Any]) -> Tables:
    """A committed threats result (``results/threats-*.json``: a report trimmed to its attack cells and
    grid): ``threats`` (every attack cell, unprotected vs Trap²), ``distill`` (each distillation cell
    against its ceiling) and ``grid`` (the attacker grid's summary), each when present."""
    from trap2.eval.threats import distill_lines, grid_lines

    report = dict(result)
    parts = {
        "threats": threats_table(report, always=True)[2:],  # without its own heading
        "distill": distill_lines(report),
        "grid": [g.lstrip("# ") + ":" if i == 0 else g for i, g in enumerate(grid_lines(report))],
    }
    return {name: "\n".join(lines).strip("\n") for name, lines in parts.items() if lines}


@renderer("merge-time")
def merge_time_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/search.py --only-methods``: each merge method's wall time on the benchmark's case,
    and the ratio to task arithmetic when it was timed."""
    methods = result["methods"]
    ta = methods.get("ta", {}).get("wall_s")
    rows = [
        [f"`{m}`", f"{v['wall_s']:.1f}", f"{v['wall_s'] / ta:.1f}×" if ta else "–"]
        for m, v in methods.items()
    ]
    return {"methods": _table(["method", "merge wall time (s)", "× task arithmetic"], rows)}


@renderer("protect")
def protect_tables(result: Mapping[str, Any]) -> Tables:
    """``trap2 protect`` measured (``results/protect-*.json``): the original update against the protected
    one — standalone, top-1 agreement, the scaling curve off s = 1, each merge cell (target / mean) and the
    compute of the protect phase as a multiple of the original fine-tuning."""
    target = result["target"]
    curve = result["scaling_curve"]
    shown = [i for i, s in enumerate(curve["s"]) if s in (0.1, 0.5, 0.9, 1.1, 2.0)]
    scales = " / ".join(f"{curve['s'][i]:g}" for i in shown)

    def at(pool: str) -> str:
        return " / ".join(pct(curve[pool][i]) for i in shown)

    rows = [
        [f"standalone `{target}`", pct(result["standalone"]["unprotected"][target]),
         pct(result["standalone"]["protected"][target])],
        ["top-1 agreement with the original (test)", pct(1.0), pct(result["agreement_test"])],
        [f"acc(s) at s = {scales}", at("unprotected"), at("protected")],
    ]  # fmt: skip
    cells: dict[tuple[str, str, str], dict[bool, Mapping[str, Any]]] = {}
    for a in result["attacks"]:
        cells.setdefault((a["method"], a["space"], a["search"]), {})[a["protected"]] = a
    for (method, space, search), pair in cells.items():
        name = METHOD_NAMES.get(method, method) + ("" if space == "full" else f" {space}")
        name += "" if search == "global" else f" {search}"
        rows.append(
            [f"{name}: `{target}` / mean of {len(result['zero_shot']) - 1}"]
            + [f"{pct(pair[p]['acc'][target])} / {pct(pair[p]['acc']['mean'])}" if p in pair else "–"
               for p in (False, True)]
        )  # fmt: skip
    zs = result["zero_shot"]
    rows.append([f"zero-shot: `{target}` / mean", f"{pct(zs[target])} / {pct(zs['mean'])}", ""])
    cost = result["cost"]
    ratios = cost["ratios"]
    rows.append(
        [
            "training compute (× the original fine-tuning)",
            "1",
            f"{ratios['protect_over_plain']:.3f} ({cost['steps']['protect']} steps; plain then protect: "
            f"{ratios['plain_then_protect_over_plain']:.3f})",
        ]
    )
    return {"summary": _table(["", "original (plain)", "protected (`trap2 protect`)"], rows)}


def _harden_cell(by: Mapping[tuple[str, str, bool], Mapping[str, Any]], key: tuple[str, str, bool]) -> str:
    a = by.get(key)
    return "–" if a is None else f"{pct(a['mean_acc'])} ({pct(a['target_acc'])})"


def _harden_curve(curve: Mapping[str, Any], key: str) -> str:
    return " / ".join(pct(curve[key][curve["s"].index(s)]) if s in curve["s"] else "–" for s in (0.5, 2.0))


@renderer("harden")
def harden_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/harden_digits.py``'s JSON: per target, the unprotected update and each objective variant
    at equal optimizer steps — standalone, acc(s) at 0.5 / 2, each attack cell as merged mean (target),
    and the protected training's wall time."""
    cells = [(m, "global") for m in result["methods"]] + [("ta", s) for s in result["searches"]]
    head = ["target", "update", "standalone", "acc(0.5) / acc(2)"]
    head += [METHOD_NAMES.get(m, m) + ("" if se == "global" else f" {se}") for m, se in cells]
    head += ["train s"]
    rows = []
    for r in result["runs"]:
        t, curve = r["target"], r["scaling_curve"]
        by = {(a["method"], a["search"], a["protected"]): a for a in r["attacks"]}
        if r["variant"] == "paper":  # the unprotected pool, once per target
            rows.append(
                [
                    f"`{t}`",
                    "unprotected",
                    pct(r["standalone"]["unprotected"]),
                    _harden_curve(curve, "unprotected"),
                ]
                + [_harden_cell(by, (m, se, False)) for m, se in cells]
                + ["–"]
            )
        train = r["train_seconds"]
        rows.append(
            [f"`{t}`", r["variant"], pct(r["standalone"]["protected"]), _harden_curve(curve, "protected")]
            + [_harden_cell(by, (m, se, True)) for m, se in cells]
            + ["–" if train is None else f"{train:.0f}"]
        )
    return {"summary": _table(head, rows)}


@renderer("lm-tasks")
def lm_tasks_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/lm_tasks.py``: each task's zero-shot and plain-LoRA exact match, the best score any
    other task's adapter reaches on it (``cross[adapter][task]``), and, where measured, the unprotected
    task-arithmetic merge of every task's adapter (its coefficient searched on validation) with a mean row."""
    tasks, cross = result["tasks"], result["cross"]
    ta = result.get("ta_merge")
    rows = []
    for t in tasks:
        zs, ft = result["zero_shot"][t], result["fine_tuned"][t]
        other = max((a for a in tasks if a != t), key=lambda a: cross[a][t])
        row = [f"`{t}`", pct(zs), pct(ft), f"{100 * (ft - zs):+.1f}", f"{pct(cross[other][t])} (`{other}`)"]
        rows.append(row + ([pct(ta["test"][t])] if ta else []))
    head = ["task", "zero-shot", "plain LoRA", "gap (pp)", "best other task's adapter"]
    if ta:
        head.append(f"TA merge (c = {ta['c']:g})")
        mean = lambda d: sum(d[t] for t in tasks) / len(tasks)  # noqa: E731
        fine = mean(result["fine_tuned"])
        rows.append(["mean", pct(mean(result["zero_shot"])), pct(fine), "", "", pct(mean(ta["test"]))])
    return {"tasks": _table(head, rows)}


@renderer("lm-lambda")
def lm_lambda_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/lm_lambda.py``: the target's scaling curve, plain and protected with each λ."""
    head = ["update", *(f"s={s:g}" for s in result["scales"])]
    rows = [
        [
            r.get("label") or ("plain" if r["lam"] is None else f"Trap² λ={r['lam']:g}"),
            *(pct(a) for a in r["curve"]),
        ]
        for r in result["rows"]
    ]
    return {"curves": _table(head, rows)}


@renderer("lm-pretrain")
def lm_pretrain_tables(result: Mapping[str, Any]) -> Tables:
    """``scripts/pretrain_lm.py --result``: the shipped backbone's pretraining run; with ``--check``, a rerun
    from the same seed next to the shipped record."""
    runs = (
        [("shipped", result["shipped"]), ("rerun", result["check"])]
        if "check" in result
        else [("run", result)]
    )
    rows = [
        [name, f"`{r['command']}`", str(r["steps"]), f"{r['val_loss']:.4f}", f"{r['train_seconds'] / 60:.1f}",
         str(r["threads"])]
        for name, r in runs
    ]  # fmt: skip
    head = ["", "command", "steps", "validation loss", "training minutes", "threads"]
    return {"pretrain": _table(head, rows)}


@renderer("mergekit-cli")
def mergekit_cli_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/mergekit_cli.py``: mergekit-yaml's merges of the unprotected pool and of the pool with
    the target protected, target / mean exact match on test at the c chosen on validation."""
    cells: dict[tuple[str, str], dict[bool, Mapping[str, Any]]] = {}
    for c in result["cells"]:
        cells.setdefault((c["target"], c["method"]), {})[c["protected"]] = c
    rows = []
    for (target, method), pair in cells.items():
        rows.append(
            [f"`{target}`", f"`{method}`"]
            + [f"{pct(pair[p]['acc'][target])} / {pct(pair[p]['acc']['mean'])} ({pair[p]['knob']} {pair[p]['c']:g})"
               if p in pair else "–" for p in (False, True)]
        )  # fmt: skip
    head = ["protected task", "mergekit method", "unprotected: target / mean", "Trap²: target / mean"]
    return {"merges": _table(head, rows)}


@renderer("protect-sweep")
def protect_sweep_tables(result: Mapping[str, Any]) -> Tables:
    """A sweep of ``trap2 protect`` settings (``benchmarks/protect_sweep.py``): per setting, top-1 agreement
    with the original, standalone accuracy, acc(s) off s = 1 and the cost against the original's plain
    steps; the rows named in ``shown`` (all when absent)."""
    curve_s = result["curve_s"]
    marks = [s for s in (0.1, 0.25, 0.5, 0.9, 1.1, 2.0) if s in curve_s]
    shown = result.get("shown")
    rows = []
    for r in result["rows"]:
        spec = r.get("spec_str") or r.get("spec (steps,lam,lr,extra)", "?")
        if shown is not None and spec not in shown:
            continue
        curve = r.get("curve")
        at = " / ".join(pct(curve[curve_s.index(s)]) for s in marks) if curve else "–"
        cost = r.get("cost_vs_plain600")
        rows.append(
            [
                f"`{spec}`",
                pct(r["agreement_test"]),
                pct(r["acc_protected"]),
                at,
                "–" if cost is None else f"{cost:.2f}×",
            ]
        )
    head = ["setting", "agreement", "standalone", "acc(s) at " + " / ".join(f"{s:g}" for s in marks), "cost"]
    return {"rows": _table(head, rows)}


@renderer("scaling-curves")
def scaling_curves_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/scaling_curves.py``: acc(s) of each update on one task, and the protect phase each one
    records (its settings and agreement with the original) where it has one."""
    scales = result["scales"]

    def g(v: float | None) -> str:  # a setting the update did not record (None) reads '?'
        return "?" if v is None else f"{v:g}"

    rows = []
    for r in result["rows"]:
        prot = r.get("protect") or {}
        obj = r.get("objective") or {}
        plain = obj.get("name", "none") == "none"
        setting = ("original" if plain else _objective_label(obj)) if not prot else (
            f"λ {g(obj.get('lam'))}, lr {g(r.get('lr'))}, {prot.get('steps', '?')} steps, "
            f"repair {g(prot.get('repair', 0))}, T {g(prot.get('temperature', 1))}"
        )  # fmt: skip
        agree = prot.get("agreement_test")
        rows.append([setting, "–" if agree is None else pct(agree), *(pct(a) for a in r["curve"])])
    tables = {"curves": _table(["update", "agreement", *(f"s={s:g}" for s in scales)], rows)}
    with_splits = [r for r in result["rows"] if r.get("splits")]
    if with_splits:
        tables["splits"] = _table(
            ["objective", "steps", "train", "val", "test"],
            [
                [_objective_label(r.get("objective") or {}), str(r.get("steps", "?")),
                 *(pct(r["splits"][k]) for k in ("train", "val", "test"))]
                for r in with_splits
            ],
        )  # fmt: skip
    return tables


_OBJECTIVE_DEFAULTS = dataclasses.asdict(ObjectiveConfig())
_OBJECTIVE_SYMBOLS = {"lam": "λ", "delta": "δ", "bound": "τ", "balance": "ρ", "collateral": "μ", "weight": "w"}  # fmt: skip


def _objective_label(obj: Mapping[str, Any]) -> str:
    """'plain', or the objective's name and λ with every other ObjectiveConfig field the JSON sets off its
    default (δ, τ, ρ, μ, w by their symbols, the rest by name), so two different objectives never share a
    label. A field the JSON does not record reads as its default (older results recorded fewer fields)."""
    name = obj.get("name", "none")
    if name == "none":
        return "plain"
    parts = [f"{name}, λ {obj.get('lam'):g}"]
    for key, default in _OBJECTIVE_DEFAULTS.items():
        if key in ("name", "lam") or obj.get(key, default) == default:
            continue
        value = obj[key]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{_OBJECTIVE_SYMBOLS.get(key, key)} {text}")
    return ", ".join(parts)


@renderer("demo-time")
def demo_time_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/demo_time.py``'s JSON: the demo's wall time from a clean folder, and each stage's share."""
    wall = result["wall_seconds"]
    total = _table(
        ["command", "wall time", "threads", "machine"],
        [[f"`{result['demo_command']}`", f"{wall:.0f} s", str(result["threads"]), result["machine"]]],
    )
    stages = _table(
        ["stage", "seconds", "share"],
        [[s["stage"], f"{s['seconds']:.0f}", f"{100 * s['seconds'] / wall:.0f} %"] for s in result["stages"]],
    )
    return {"total": total, "stages": stages}


@renderer("step-time-extensions")
def step_time_extensions_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/step_time.py --part extensions``: the median time of one optimizer step of each variant
    (the paper's objective, each hardening extension, the protect phase's step) and its ratio to the plain
    step (``result['plain']``), LoRA and full fine-tuning."""
    plain = result["plain"]
    rows = []
    for v in result["variants"]:
        name, cells = v["variant"], [f"`{v['variant']}`"]
        for mode in ("lora", "full"):
            sec = result["modes"].get(mode, {}).get("step_seconds", {})
            t, t0 = sec.get(name), sec.get(plain)
            cells += ["–", "–"] if t is None or not t0 else [f"{1000 * t:.1f}", f"{t / t0:.2f}×"]
        rows.append(cells)
    return {"steps": _table(["variant", "LoRA ms", "LoRA × plain", "full ms", "full × plain"], rows)}


@renderer("step-time-recipes")
def step_time_recipes_tables(result: Mapping[str, Any]) -> Tables:
    """``benchmarks/step_time.py --part recipes``: per suite and mode, the bench recipe's protected step
    against the same recipe's plain step, and the protected run's total training compute in plain-step
    units (protected steps × step ratio) beside the plain recipe's steps."""
    rows = []
    for r in result["rows"]:
        obj = r["objective"]
        knobs = ", ".join(f"{k} {obj[k]:g}" for k in ("lam", "collateral", "bound") if obj.get(k))
        law = f", law {obj['law']}" if obj.get("law") not in (None, "uniform") else ""
        sec = r["step_seconds"]
        rows.append(
            [
                f"{r['suite']} {r['mode']}",
                f"{obj['name']} ({knobs}{law})" if knobs or law else obj["name"],
                str(r["batch"]),
                f"{1000 * sec['plain']:.0f}",
                f"{1000 * sec['protected']:.0f}",
                f"{r['step_ratio']:.2f}×",
                f"{r['plain_steps']} / {r['protect_steps']}",
                f"{r['protected_compute']:,.0f}",
                f"{r['vs_plain_recipe']:.1f}×",
            ]
        )
    head = [
        "suite, mode",
        "recipe objective",
        "batch",
        "plain ms",
        "protected ms",
        "step × plain",
        "steps plain / protected",
        "protected compute (plain steps)",
        "× plain recipe",
    ]
    return {"recipes": _table(head, rows)}


def markdown(report: Mapping[str, Any]) -> str:
    from trap2.eval.threats import distill_lines, grid_lines  # the threats part (docs/threats.md)

    tables = demo_tables(report)
    target = report["target"]
    lines = [
        f"# trap2 report: suite `{report['suite']}`, protected task `{target}`",
        "",
        "Accuracies in %, test split. Merges: coefficient searched on the validation split "
        "(paper grid 0.1…9.9, early stop 10, criterion mean normalised accuracy).",
        "",
        "## Standalone",
        "",
        tables["standalone"],
        "",
        f"## Scaling curve of `{target}`: accuracy of W0 + s·ΔW",
        "",
        tables["curve"],
        "",
        f"## Merged ({len(report['tasks'])} tasks)",
        "",
        tables["merges"],
        "",
        *table2(dict(report)),
        *threats_table(dict(report)),
        *distill_lines(dict(report)),
        *grid_lines(dict(report)),
        f"Wall time: {report['wall_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


DEFENSE_NAMES = {"params": "PaRaMS", "merge_lock": "Merge-Lock"}


def threats_table(report: dict[str, Any], always: bool = False) -> list[str]:
    """Stronger threats: every attack cell against the unprotected pool, Trap² and each post-hoc defense
    (merged mean, target in brackets); nothing when every cell is a global search without defenses (the
    report's merge table already shows them) unless ``always``."""
    target = report["target"]
    rows: dict[tuple[str, str, str], dict[str, str]] = {}

    def cell(a: dict[str, Any]) -> str:
        return f"{pct(a['acc']['mean'])} ({pct(a['acc'][target])})"

    for a in report["attacks"]:
        rows.setdefault((a["method"], a["space"], a["search"]), {})[
            "Trap²" if a["protected"] else "unprotected"
        ] = cell(a)
    for a in report.get("baselines", []):
        rows.setdefault((a["method"], a["space"], a["search"]), {})[DEFENSE_NAMES[a["defense"]]] = cell(a)
    cols = [
        "unprotected",
        "Trap²",
        *dict.fromkeys(DEFENSE_NAMES[a["defense"]] for a in report.get("baselines", [])),
    ]
    if not always and len(cols) == 2 and len({k[2] for k in rows}) == 1:
        return []  # nothing beyond table 2
    lines = [
        f"## Stronger threats: merged mean ({target}), zero-shot mean {pct(report['zero_shot']['mean'])}",
        "",
        "| attack | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for (m, sp, se), got in rows.items():
        label = " ".join(x for x in (m, sp if sp != "full" else "", se if se != "global" else "") if x)
        lines.append(f"| {label} | " + " | ".join(got.get(c, "–") for c in cols) + " |")
    return [*lines, "", *recovery_lines(report)]


def recovery_gaps(report: dict[str, Any]) -> list[dict[str, Any]]:
    """For each recovery cell: the share of the gap between the Trap² merge and the unprotected merge
    (both from the global search) that fine-tuning the Trap² merge on k samples per task closes."""
    mean = {
        (a["method"], a["space"], a["search"], a["protected"]): a["acc"]["mean"] for a in report["attacks"]
    }
    from_w0 = {a["search"]: a["from_w0"]["mean"] for a in report["attacks"] if "from_w0" in a}
    out = []
    for (m, sp, se, prot), acc in mean.items():
        if not (prot and se.startswith("recover")):
            continue
        trapped, plain = mean.get((m, sp, "global", True)), mean.get((m, sp, "global", False))
        if trapped is None or plain is None:
            continue
        gap = plain - trapped
        out.append(
            {
                "method": m,
                "space": sp,
                "search": se,
                "trap2": trapped,
                "unprotected": plain,
                "recovered": acc,
                "unprotected_recovered": mean.get((m, sp, se, False)),
                "from_w0": from_w0.get(se),
                "closed": (acc - trapped) / gap if gap > 1e-9 else None,
            }
        )
    return out


def recovery_lines(report: dict[str, Any]) -> list[str]:
    gaps = recovery_gaps(report)
    if not gaps:
        return []
    lines = ["Recovery fine-tuning of the merge (k labelled samples per task), Trap² pool:", ""]
    for g in gaps:
        closed = "no gap to close" if g["closed"] is None else f"closes {100 * g['closed']:.0f} % of the gap"
        where = g["method"] + ("" if g["space"] == "full" else f" {g['space']}")
        lines.append(
            f"- {where}, k = {g['search'].removeprefix('recover')}: {pct(g['trap2'])} → {pct(g['recovered'])} "
            f"(unprotected merge {pct(g['unprotected'])}, itself recovered to "
            f"{pct(g['unprotected_recovered'])}; W0 itself recovered to {pct(g['from_w0'])}): {closed}."
        )
    return [*lines, ""]


def table2(report: dict[str, Any]) -> list[str]:
    """The paper's Table 2 layout: mean merged accuracy, rows unprotected / Trap², columns method × space."""
    cells = list(
        dict.fromkeys((a["method"], a["space"]) for a in report["attacks"] if a["search"] == "global")
    )
    if not cells:
        return []
    acc = {
        (a["method"], a["space"], a["protected"]): a["acc"]["mean"]
        for a in report["attacks"]
        if a["search"] == "global"
    }
    header = " | ".join(f"{m} {sp}" if m != "ta" else "ta" for m, sp in cells)
    lines = [
        f"## Mean merged accuracy, global coefficient search (zero-shot {pct(report['zero_shot']['mean'])})",
        "",
        f"| pool | {header} |",
        "|---|" + "---|" * len(cells),
    ]
    for prot, label in ((False, "unprotected"), (True, "with Trap²")):
        lines.append(f"| {label} | " + " | ".join(pct(acc.get((m, sp, prot))) for m, sp in cells) + " |")
    return [*lines, ""]


def plot_scaling_curve(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["scaling_curve"]
    fig, ax = plt.subplots(figsize=(6, 4.0), dpi=120)
    ax.plot(curve["s"], [100 * a for a in curve["unprotected"]], "o-", label="unprotected")
    ax.plot(curve["s"], [100 * a for a in curve["protected"]], "s-", color="C3", label="Trap²")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(100 * report["zero_shot"][report["target"]], color="grey", lw=0.8, ls="--", label="zero-shot")
    ax.set_xlabel("scale s of the update (W0 + s·ΔW)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['suite']} / {report['target']}: scaling curve")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_merge_heatmap(report: dict[str, Any], path: str | Path) -> bool:
    """Mean merged accuracy (global search), methods × spaces, one panel per pool; False if no cells."""
    cells = [a for a in report["attacks"] if a["search"] == "global"]
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    methods = list(dict.fromkeys(a["method"] for a in cells))
    spaces = list(dict.fromkeys(a["space"] for a in cells))
    zs = 100 * report["zero_shot"]["mean"]
    grids = {}
    for prot in (False, True):
        g = np.full((len(methods), len(spaces)), np.nan)
        for a in cells:
            if a["protected"] == prot:
                g[methods.index(a["method"]), spaces.index(a["space"])] = 100 * a["acc"]["mean"]
        grids[prot] = g
    values = np.concatenate([g.ravel() for g in grids.values()])
    norm = TwoSlopeNorm(vcenter=zs, vmin=min(np.nanmin(values), zs - 1), vmax=max(np.nanmax(values), zs + 1))
    fig, axes = plt.subplots(
        1, 2, figsize=(max(6.0, 2.2 + 2.6 * len(spaces)), 1.5 + 0.5 * len(methods)), dpi=120
    )
    for ax, prot in zip(axes, (False, True), strict=True):
        ax.imshow(grids[prot], cmap="RdYlGn", norm=norm, aspect="auto")
        ax.set_xticks(range(len(spaces)), spaces)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title("with Trap²" if prot else "unprotected", fontsize=9)
        for i in range(len(methods)):
            for j in range(len(spaces)):
                v = grids[prot][i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8)
    fig.suptitle(
        f"{report['suite']}: mean merged accuracy (%)\n{report['target']} protected; zero-shot {zs:.1f} = yellow",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``report.json`` (with the :func:`provenance` keys it lacks; ``kind`` defaults to ``demo``,
    ``audit`` when it names an audited update), ``report.md`` and the plots to ``out``."""
    out = Path(out)
    for k, v in provenance("audit" if "audited" in report else "demo").items():
        report.setdefault(k, v)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "scaling_curve.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    plot_scaling_curve(report, paths["png"])
    if plot_merge_heatmap(report, out / "merge_heatmap.png"):
        paths["heatmap"] = out / "merge_heatmap.png"
    return paths
