"""Reports: ``report.json`` (schema in the README), ``report.md`` and the scaling-curve PNG."""

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
    lines += ["", *table2(report), f"Wall time: {report['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


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


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "scaling_curve.png"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    plot_scaling_curve(report, paths["png"])
    return paths
