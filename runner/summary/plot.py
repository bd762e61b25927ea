"""tradeoff.png: clean against robust accuracy per group. matplotlib is imported only when a plot is drawn,
so that importing the package stays light."""

import math
import textwrap
from pathlib import Path

from runner.summary.settings import eps_text

# The robust axis: the first of these any group measured, the strongest evaluation first.
ROBUST_PREFERENCE = ["autoattack/acc", "pgd/acc", "certified/acc", "certified/ibp/acc"]


def robust_axis_label(robust_key: str, runs: list[dict]) -> str:
    settings = [r["eval"].get(robust_key) for r in runs]
    settings = [s for s in settings if isinstance(s, dict)]
    name = {"autoattack/acc": "AutoAttack", "certified/acc": "certified", "certified/ibp/acc": "IBP-certified"}.get(
        robust_key, robust_key)
    if robust_key == "pgd/acc":
        steps = {s.get("steps") for s in settings}
        name = f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
    eps = {eps_text(s.get("norm"), s.get("eps"), s.get("eps_255")) for s in settings}
    eps.discard("")
    where = next(iter(eps)) if len(eps) == 1 else ("eps differs between groups" if eps else "eps not recorded")
    return f"{name} accuracy (%), {where}"


def write_tradeoff(path: Path, rows: list[dict], groups: dict) -> tuple[str | None, list[str]]:
    """Clean against robust accuracy (percent): one point per seed (faint) and the mean ± std per group.
    Returns the robust metric and the groups left out (no clean/acc or no robust metric), which the
    figure names under the axes."""
    robust_key = next((k for k in ROBUST_PREFERENCE if any(k in r["values"] for r in rows)), None)
    if robust_key is None or not any("clean/acc" in r["values"] for r in rows):
        return None, []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.2, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(rows))]
    omitted, plotted_runs = [], []
    for row, colour in zip(rows, colours):
        if "clean/acc" not in row["values"] or robust_key not in row["values"]:
            omitted.append(row["label"])
            continue
        runs = [
            r for r in groups[row["label"]].values() if "clean/acc" in r["metrics"] and robust_key in r["metrics"]
        ]
        plotted_runs += runs
        axes.scatter(
            [100 * r["metrics"]["clean/acc"] for r in runs], [100 * r["metrics"][robust_key] for r in runs],
            color=colour, alpha=0.35, s=18,
        )
        (cx, cs, _), (rx, rs, _) = row["values"]["clean/acc"], row["values"][robust_key]
        axes.errorbar(
            100 * cx,
            100 * rx,
            xerr=0 if math.isnan(cs) else 100 * cs,
            yerr=0 if math.isnan(rs) else 100 * rs,
            fmt="o",
            color=colour,
            capsize=3,
            label=textwrap.fill(f"{row['label']} (n={len(runs)})", 48, subsequent_indent="  "),
        )
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel(robust_axis_label(robust_key, plotted_runs))
    axes.set_title("Clean vs robust accuracy (mean ± std over seeds)")
    if omitted:
        figure.supxlabel(f"Not plotted (no clean/acc or {robust_key}): " + ", ".join(omitted), fontsize=7)
    figure.legend(loc="outside right center", fontsize=8)  # beside the axes: never over a point
    figure.savefig(path, dpi=110)
    return robust_key, omitted
