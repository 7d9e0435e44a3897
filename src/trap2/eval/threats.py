"""Markdown for the threats part of a report: the distillation ceiling next to the ``distill`` cells, and
the attacker grid's summary (worst case, median, head start, smallest budget per attack).

A committed threats result (``results/threats-*.json``, ``"kind": "threats"``) is a report trimmed to
what these tables read, so :func:`threats_markdown` re-renders the docs tables from it:

    trap2 report results/threats-digits.json
"""

from __future__ import annotations

from typing import Any

from trap2.eval.report import pct, threats_table


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def distill_lines(report: dict[str, Any]) -> list[str]:
    """Each ``distill`` cell against its ceiling: a protected update is protected against distillation
    only where the merge built from its student is no better than a fresh LoRA distilled alone."""
    target = report["target"]
    rows = [a for a in report["attacks"] if a["search"] == "distill" and "ceiling" in a]
    if not rows:
        return []
    lines = [
        f"Distillation (DisTaC-style student, norm matched to the other members) against the ceiling "
        f"(a fresh LoRA distilled on the same unlabelled budget, alone), `{target}` test accuracy:",
        "",
    ]
    for a in rows:
        where = a["method"] + ("" if a["space"] == "full" else f" {a['space']}")
        pool = "Trap²" if a["protected"] else "unprotected"
        got, ceiling = a["acc"][target], a["ceiling"][target]
        verdict = "above the ceiling: not protected" if got > ceiling else "at or below the ceiling"
        lines.append(
            f"- {where}, {pool} pool: merged {pct(got)} (mean {pct(a['acc']['mean'])}) vs ceiling "
            f"{pct(ceiling)}: {verdict}."
        )
    return [*lines, ""]


def _budget(b: dict[str, Any] | None) -> str:
    if b is None:
        return "not reached"
    p = b["point"]
    return f"{b['samples']} × {b['steps']} steps ({p['mode']}, {p['optimiser']}, lr {p['lr']:g}): {pct(b['mean'])}"


def grid_lines(report: dict[str, Any]) -> list[str]:
    """The attacker grid's summary table (empty without a ``threats`` entry)."""
    threats = report.get("threats")
    if not threats:
        return []
    target, ref, st = threats["target"], threats["reference"], threats["settings"]
    size = " × ".join(
        f"{k} {{{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in st[k])}}}"
        for k in ("lrs", "steps", "samples", "modes", "optimisers", "seeds")
    )
    lines = [
        f"## Attacker grid (`{threats['grid']}`): {size}",
        "",
        f"Trap² pool, task arithmetic with the coefficient searched on validation; merged mean (`{target}`). "
        f"References: unprotected TA merge {pct(ref['unprotected_ta']['mean'])} "
        f"({pct(ref['unprotected_ta']['target'])}), Trap² TA merge {pct(ref['trap2_ta']['mean'])} "
        f"({pct(ref['trap2_ta']['target'])}); 90 % of the unprotected merge: "
        f"{pct(0.9 * ref['unprotected_ta']['mean'])}.",
        "",
        "| attack | points | worst case (attacker's best) | at | median | from W0 at worst | head start "
        "| smallest budget ≥ 90 % | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in threats["attacks"].items():
        s = a["summary"]
        p = s["worst_point"]
        at = f"{p['samples']} × {p['steps']}, {p['mode']}, {p['optimiser']}, lr {p['lr']:g}"
        metric = "mean" if s["head_start_metric"] == "mean" else f"`{target}`"
        lines.append(
            f"| {name} | {s['points']} | {pct(s['worst'])} ({pct(s['worst_target'])}) | {at} | "
            f"{pct(s['median'])} | {pct(s['from_w0_at_worst'])} ({metric}) | {_pp(s['head_start'])} pp "
            f"({metric}) | {_budget(s['min_budget'])} | {a['wall_seconds']:.0f} |"
        )
    return [*lines, "", f"Grid wall time: {threats['wall_seconds']:.0f} s.", ""]


def threats_lines(report: dict[str, Any]) -> list[str]:
    """The stronger-threats table, the distillation ceilings and the attacker grid, in that order (the
    first line a heading: the bench drops it under its own)."""
    lines = [*threats_table(report), *distill_lines(report), *grid_lines(report)]
    if lines and not lines[0].startswith("## Stronger threats"):
        lines = ["## Stronger threats", *lines]
    return lines


def threats_markdown(report: dict[str, Any]) -> str:
    """The threats tables of a report or a committed threats result: every attack cell unprotected vs
    Trap², the distillation ceiling, the attacker grid; with the command and wall time when recorded."""
    lines = threats_lines(report)
    if "command" in report:
        lines += [f"Command: `{report['command']}`", ""]
    if "wall_seconds" in report:
        lines += [f"Wall time: {report['wall_seconds']:.0f} s ({report.get('threads', '?')} threads).", ""]
    return "\n".join(lines)
