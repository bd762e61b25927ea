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


def write_tex(path: Path, rows: list[dict], metrics: list[str], root: Path, settings: list[str]) -> None:
    """A booktabs table: mean ± std over seeds, accuracies (and ECE) in percent."""
    def tex_cell(metric: str, entry) -> str:
        if entry is None:
            return "--"
        mean, std, n = entry
        scale, digits = (100, 2) if in_percent(metric) else (1, 4)
        return f"${mean * scale:.{digits}f}$" if n < 2 else f"${mean * scale:.{digits}f} \\pm {std * scale:.{digits}f}$"

    header = " & ".join(tex(m) + (r" (\%)" if in_percent(m) else "") for m in metrics)
    lines = [
        f"% scripts/summarize.py: {tex(root_name(root))}; needs \\usepackage{{booktabs}}",
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{tex(root_name(root))}: mean $\\pm$ standard deviation over seeds (n$-$1), in percent.}}",
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
