"""Reports: ``report.json`` (schema in the README), ``report.md``, the scaling-curve PNG and a heat map of
the merged accuracy (method × space, unprotected vs protected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trap2.io import atomic_path, write_json, write_text


def pct(acc: float | None) -> str:
    return "–" if acc is None else f"{100 * acc:.1f}"


def markdown(report: dict[str, Any]) -> str:
    tasks, target = report["tasks"], report["target"]
    zs, ft = report["zero_shot"], report["standalone"]["unprotected"]
    prot = report["standalone"]["protected"]
    lines = [
        f"# trap2 report: suite `{report['suite']}`, protected task `{target}`",
        "",
        "Accuracies in %, test split. Merges: coefficient searched on the validation split "
        "(paper grid 0.1…9.9, early stop 10, criterion mean normalised accuracy).",
        "",
        "## Standalone",
        "",
        "| | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * (len(tasks) + 1),
        "| zero-shot | " + " | ".join(pct(zs[t]) for t in tasks) + f" | {pct(zs['mean'])} |",
        "| fine-tuned | " + " | ".join(pct(ft[t]) for t in tasks) + f" | {pct(ft['mean'])} |",
        "| Trap² | " + " | ".join(pct(prot.get(t)) for t in tasks) + " | |",
        "",
        f"## Scaling curve of `{target}`: accuracy of W0 + s·ΔW",
        "",
        "| s | " + " | ".join(f"{s:g}" for s in report["scaling_curve"]["s"]) + " |",
        "|---|" + "---|" * len(report["scaling_curve"]["s"]),
        "| unprotected | " + " | ".join(pct(a) for a in report["scaling_curve"]["unprotected"]) + " |",
        "| Trap² | " + " | ".join(pct(a) for a in report["scaling_curve"]["protected"]) + " |",
        "",
        f"## Merged ({len(tasks)} tasks)",
        "",
        f"| method | space | search | pool | c | {target} | mean | vs zero-shot mean {pct(zs['mean'])} |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
        lines.append(
            f"| {method} | {a['space']} | {a['search']} | {pool} | {coef} | "
            f"{pct(a['acc'][target])} | {pct(a['acc']['mean'])} | {verdict} |"
        )
    from trap2.eval.threats import distill_lines, grid_lines  # the threats part (docs/threats.md)

    lines += ["", *table2(report), *threats_table(report), *distill_lines(report), *grid_lines(report)]
    lines += [f"Wall time: {report['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


DEFENSE_NAMES = {"params": "PaRaMS", "merge_lock": "Merge-Lock"}


def threats_table(report: dict[str, Any]) -> list[str]:
    """Stronger threats: every attack cell against the unprotected pool, Trap² and each post-hoc defense
    (merged mean, target in brackets)."""
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
    if len(cols) == 2 and len({k[2] for k in rows}) == 1:
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
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "scaling_curve.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    plot_scaling_curve(report, paths["png"])
    if plot_merge_heatmap(report, out / "merge_heatmap.png"):
        paths["heatmap"] = out / "merge_heatmap.png"
    return paths
