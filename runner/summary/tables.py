"""The main table: which metrics are its columns, and summary.md, summary.csv and summary.tex (booktabs,
accuracies in percent)."""

import csv
import math
from pathlib import Path

from runner.report_tables import CONTRACT
from runner.summary.settings import settings_lines


def choose_metrics(runs: list[dict], requested: list[str] | None) -> list[str]:
    """The columns: --metrics as given (each must be in some run), else the contract's metrics any run has,
    in the report's order."""
    present = {k for r in runs for k in r["metrics"]}
    if requested:
        missing = [m for m in requested if m not in present]
        if missing:
            raise SystemExit(
                f"summarize: --metrics {missing} are in no results.json; present: {sorted(present)}"
            )
        return requested
    return [m for m in CONTRACT if m in present]


def cell(entry) -> str:
    if entry is None:
        return "–"
    mean, std, n = entry
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def root_name(root: Path) -> str:
    return root.resolve().name or str(root)


def markdown(rows: list[dict], metrics: list[str], root: Path, notes: list[str], groups: dict) -> str:
    lines = [
        f"# Summary of {root_name(root)}",
        "",
        "Mean ± standard deviation over seeds (sample std, n−1); a single seed shows its value.",
        "",
        "| method | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {', '.join(map(str, row['seeds']))} | "
            + " | ".join(cell(row["values"].get(m)) for m in metrics)
            + " |"
        )
    lines += settings_lines(groups, [row["label"] for row in rows], metrics)
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], metrics: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["method", "n_seeds", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
        )
        for row in rows:
            values = []
            for metric in metrics:
                entry = row["values"].get(metric)
                values += (
                    ["", ""]
                    if entry is None
                    else [f"{entry[0]:.6f}", "" if math.isnan(entry[1]) else f"{entry[1]:.6f}"]
                )
            writer.writerow([row["label"], len(row["seeds"]), " ".join(map(str, row["seeds"]))] + values)


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(c, c) for c in str(text))


def in_percent(metric: str) -> bool:
    last = metric.rsplit("/", 1)[-1]
    return last.endswith("acc") or last == "ece"


TITLES = {
    "clean/acc": "Clean", "autoattack/acc": "AutoAttack", "certified/acc": "Certified",
    "certified/ibp/acc": "IBP cert.", "certified/crown_ibp/acc": "CROWN-IBP cert.",
    "certified/crown/acc": "CROWN cert.", "corruption/mean_acc": "Corruptions", "calibration/ece": "ECE",
    "class/worst_acc": "Worst class", "class/robust_worst_acc": "Worst class (robust)",
}


NORM_TEX = {"linf": "$\\ell_\\infty$", "l2": "$\\ell_2$"}


def column_title(metric: str, settings: dict | None) -> str:
    """A paper's column head for a metric (TeX): PGD columns name their steps and restarts, curve points
    their eps; anything else not in TITLES keeps its key."""
    settings = settings if isinstance(settings, dict) else {}
    eps = settings.get("eps")
    if metric == "pgd/acc" or (metric.startswith("pgd/") and isinstance(eps, int | float)):
        steps, restarts = settings.get("steps"), settings.get("restarts")
        title = f"PGD-{steps}" if isinstance(steps, int) else "PGD"
        if isinstance(restarts, int) and restarts > 1:
            title += f"$\\times${restarts}"
        if metric == "pgd/acc":
            return title
        norm = metric.split("/")[1] if metric.split("/")[1] in NORM_TEX else None  # pgd/l2/eps_0.5/acc
        return f"{title} ({NORM_TEX[norm] + ', ' if norm else ''}$\\epsilon$={eps:g})"
    return TITLES.get(metric, tex(metric))


def threat_caption(groups: dict) -> str:
    """The threat every run shares, as a caption's first words ('' when runs differ or none is recorded)."""
    threats = set()
    for runs in groups.values():
        for run in runs.values():
            threat = run.get("eval_threat") or run["run"].get("threat") or {}  # robust-eval: what it attacked
            threats.add((threat.get("norm"), threat.get("eps")))
    if len(threats) != 1:
        return ""
    norm, eps = next(iter(threats))
    if not isinstance(eps, int | float) or norm not in ("linf", "l2"):
        return ""
    if norm == "l2":
        return f"$\\ell_2$, $\\epsilon = {eps:g}$. "
    return f"$\\ell_\\infty$, $\\epsilon = {eps:g}$ ($= {eps * 255:.4g}/255$). "


def write_tex(path: Path, rows: list[dict], metrics: list[str], root: Path, settings: list[str],
              groups: dict | None = None) -> None:
    """A booktabs table: mean ± std over seeds, accuracies (and ECE) in percent; column heads in words
    (PGD with its steps), the shared threat in the caption, every setting in the comments below."""
    def tex_cell(metric: str, entry) -> str:
        if entry is None:
            return "--"
        mean, std, n = entry
        scale, digits = (100, 2) if in_percent(metric) else (1, 4)
        return f"${mean * scale:.{digits}f}$" if n < 2 else f"${mean * scale:.{digits}f} \\pm {std * scale:.{digits}f}$"

    groups = groups or {}

    def title(metric: str) -> str:
        """The head the runs' settings give; without the settings when runs differ (the comments say how)."""
        titles = {column_title(metric, r["eval"].get(metric)) for runs in groups.values() for r in runs.values()
                  if metric in r["metrics"]}
        return titles.pop() if len(titles) == 1 else column_title(metric, None)

    header = " & ".join(title(m) + (r" (\%)" if in_percent(m) else "") for m in metrics)
    lines = [
        f"% scripts/summarize.py: {tex(root_name(root))}; needs \\usepackage{{booktabs}}",
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{tex(root_name(root))}: {threat_caption(groups)}Mean $\\pm$ standard deviation over seeds "
        "(n$-$1), in percent.}",
        r"\begin{tabular}{l" + "r" + "c" * len(metrics) + "}",
        r"\toprule",
        f"Method & Seeds & {header} \\\\",
        r"\midrule",
    ]
    for row in rows:
        cells = " & ".join(tex_cell(m, row["values"].get(m)) for m in metrics)
        lines.append(f"{tex(row['label'])} & {len(row['seeds'])} & {cells} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += [f"% {line.replace('**', '')}" for line in settings if line]
    path.write_text("\n".join(lines) + "\n")
