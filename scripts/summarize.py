"""Summarise many runs into one table: method × metric, mean ± std over seeds.

    python scripts/summarize.py <sweep or outputs dir> [--out DIR] [--metrics clean/acc,pgd/acc] [--paired erm]

Reads every results.json below the directory (train runs and robust-eval runs alike), groups runs
that differ only in their seed, and writes summary.md, summary.csv and tradeoff.png (clean against
robust accuracy: AutoAttack where measured, else PGD) into --out (default: the directory itself).
The markdown table is also printed. A group's label is its method plus whatever else differs
between groups (dataset, model, threat, label noise). The same run evaluated twice (same label and
seed) counts once: the newest results.json wins, and the table says so.

`--paired METHOD` adds the comparison a single-seed table cannot make: each other method minus METHOD
on the seeds both ran (same data order, same initialisation), as the mean difference with its 95%
confidence interval (Student t over seeds) and on how many seeds the method was at least METHOD.
Groups pair within the same setting (a "sam noise=0.3" group against "erm noise=0.3"). Written to
paired.md and paired.csv and printed after the main table.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from runner.report import CONTRACT

# The contract's metrics first, in the report's order, when present in any run.
ROBUST_PREFERENCE = ["autoattack/acc", "pgd/acc", "certified/acc", "certified/ibp/acc"]
LABEL_FIELDS = ["dataset", "model", "threat", "label_noise"]


def find_results(root: Path) -> list[Path]:
    """Every results.json below root, except the earlier evaluations a run directory keeps in
    `earlier/<time>/` (a finished run evaluated again with another suite: the newest one is the run's)."""
    return sorted(p for p in root.rglob("results.json") if p.is_file() and p.parent.parent.name != "earlier")


def describe(value) -> str:
    if isinstance(value, dict):
        if "norm" in value and "eps" in value:
            return f"{value['norm']} eps={value['eps']:.4g}"
        if "fraction" in value:
            return f"noise={value['fraction']:g}" + (f" {value.get('kind')}" if value.get("fraction") else "")
        return json.dumps(value, sort_keys=True)
    return str(value)


def load_runs(root: Path) -> tuple[list[dict], list[str]]:
    runs, notes = [], []
    for path in find_results(root):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            notes.append(f"skipped {path}: unreadable ({err})")
            continue
        if not isinstance(results, dict):
            notes.append(f"skipped {path}: not a JSON object (a {type(results).__name__})")
            continue
        run = results.get("run")
        if not isinstance(run, dict) or "method" not in run:
            notes.append(f"skipped {path}: no 'run' section with a method")
            continue
        metrics = results.get("metrics")
        runs.append(
            {"path": path, "run": run, "metrics": metrics if isinstance(metrics, dict) else {},
             "mtime": path.stat().st_mtime}
        )
    return runs, notes


def group_runs(runs: list[dict]) -> tuple[dict, list[str]]:
    """{label: {seed: run}}; the label names the method and whatever else varies between runs."""
    varying = [f for f in LABEL_FIELDS if len({describe(r["run"].get(f)) for r in runs}) > 1]
    groups: dict = {}
    notes = []
    for run in sorted(runs, key=lambda r: r["mtime"]):
        info = run["run"]
        label = info["method"] + "".join(
            f" {describe(info.get(f))}" if f != "dataset" and f != "model" else f" {info.get(f)}"
            for f in varying
        )
        seeds = groups.setdefault(label, {})
        seed = info.get("seed")
        if seed in seeds:
            notes.append(f"{label} seed {seed}: {seeds[seed]['path']} and {run['path']}; using the newest")
        seeds[seed] = run
    return groups, notes


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_order(seed) -> tuple:
    """Integer seeds in numeric order (2 before 10), anything else after them."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def summarise(groups: dict, metrics: list[str]) -> list[dict]:
    rows = []
    for label in sorted(groups):
        seeds = groups[label]
        row = {"label": label, "seeds": sorted(seeds, key=seed_order), "values": {}}
        for metric in metrics:
            values = [
                r["metrics"][metric]
                for r in seeds.values()
                if isinstance(r["metrics"].get(metric), int | float)
            ]
            if values:
                row["values"][metric] = (*mean_std(values), len(values))
        rows.append(row)
    return rows


def t_quantile_975(dof: int) -> float:
    from scipy.stats import t  # scikit-learn's dependency; imported only when --paired asks for it

    return float(t.ppf(0.975, dof))


def split_label(label: str) -> tuple[str, str]:
    """(method, the rest of the label): method names have no spaces."""
    method, _, rest = label.partition(" ")
    return method, rest


def paired_differences(groups: dict, metrics: list[str], baseline: str) -> list[dict]:
    """Per group and metric: differences to the baseline method's group of the same setting, seed by seed."""
    rows = []
    for label in sorted(groups):
        method, rest = split_label(label)
        reference = next((g for g in groups if split_label(g) == (baseline, rest)), None)
        if method == baseline or reference is None:
            continue
        row = {"label": label, "baseline": reference, "values": {}}
        for metric in metrics:
            pairs = [
                (run["metrics"][metric], groups[reference][seed]["metrics"][metric])
                for seed, run in groups[label].items()
                if seed in groups[reference]
                and isinstance(run["metrics"].get(metric), int | float)
                and isinstance(groups[reference][seed]["metrics"].get(metric), int | float)
            ]
            if not pairs:
                continue
            diffs = [a - b for a, b in pairs]
            mean, std = mean_std(diffs)
            half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            at_least = sum(d >= 0 for d in diffs)
            row["values"][metric] = {"mean": mean, "ci95": half, "at_least": at_least, "n": len(diffs)}
        rows.append(row)
    return rows


def paired_markdown(rows: list[dict], metrics: list[str], baseline: str) -> str:
    lines = [
        f"## Paired against {baseline} (same seeds)",
        "",
        f"Mean of (method − {baseline}) over the seeds both ran, ± the 95% confidence half-width (Student t),",
        f"then on how many of those seeds the method scored at least {baseline}'s value.",
        "",
        "| method | against | " + " | ".join(f"`{m}`" for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for row in rows:
        cells = []
        for metric in metrics:
            v = row["values"].get(metric)
            if v is None:
                cells.append("–")
                continue
            spread = "" if math.isnan(v["ci95"]) else f" ± {v['ci95']:.4f}"
            cells.append(f"{v['mean']:+.4f}{spread} (≥ on {v['at_least']}/{v['n']})")
        lines.append(f"| {row['label']} | {row['baseline']} | " + " | ".join(cells) + " |")
    if not rows:
        lines.append(f"\nNo group has a {baseline} group of the same setting to pair with.")
    return "\n".join(lines) + "\n"


def write_paired_csv(path: Path, rows: list[dict], metrics: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "baseline", "metric", "n_seeds", "mean_difference", "ci95", "at_least"])
        for row in rows:
            for metric in metrics:
                v = row["values"].get(metric)
                if v is not None:
                    ci = "" if math.isnan(v["ci95"]) else f"{v['ci95']:.6f}"
                    mean = f"{v['mean']:.6f}"
                    writer.writerow([row["label"], row["baseline"], metric, v["n"], mean, ci, v["at_least"]])


def choose_metrics(runs: list[dict], requested: list[str] | None) -> list[str]:
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


def markdown(rows: list[dict], metrics: list[str], root: Path, notes: list[str]) -> str:
    lines = [
        f"# Summary of {root}",
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


def write_tradeoff(path: Path, rows: list[dict], groups: dict) -> str | None:
    """Clean against robust accuracy: one point per seed (faint) and the mean ± std per method."""
    robust_key = next((k for k in ROBUST_PREFERENCE if any(k in r["values"] for r in rows)), None)
    if robust_key is None or not any("clean/acc" in r["values"] for r in rows):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.2, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for row, colour in zip(rows, colours):
        if "clean/acc" not in row["values"] or robust_key not in row["values"]:
            continue
        seeds = [
            r["metrics"]
            for r in groups[row["label"]].values()
            if "clean/acc" in r["metrics"] and robust_key in r["metrics"]
        ]
        axes.scatter(
            [m["clean/acc"] for m in seeds], [m[robust_key] for m in seeds], color=colour, alpha=0.35, s=18
        )
        (cx, cs, _), (rx, rs, _) = row["values"]["clean/acc"], row["values"][robust_key]
        axes.errorbar(
            cx,
            rx,
            xerr=0 if math.isnan(cs) else cs,
            yerr=0 if math.isnan(rs) else rs,
            fmt="o",
            color=colour,
            capsize=3,
            label=f"{row['label']} (n={len(seeds)})",
        )
    axes.set_xlabel("clean accuracy")
    axes.set_ylabel(f"robust accuracy ({robust_key})")
    axes.set_title("Clean vs robust accuracy (mean ± std over seeds)")
    figure.legend(loc="outside right center", fontsize=8)  # beside the axes: never over a point
    figure.savefig(path, dpi=110)
    return robust_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a sweep directory, or outputs/ (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default: root)")
    parser.add_argument(
        "--metrics", default=None, help="comma-separated metric keys (default: the contract's)"
    )
    parser.add_argument(
        "--paired",
        metavar="METHOD",
        default=None,
        help="also compare every other method with METHOD seed by seed (mean difference, 95%% CI)",
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"summarize: {args.root} is not a directory", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"summarize: --out {args.out} is a file, not a directory: give a directory to write into",
              file=sys.stderr)
        return 2
    runs, notes = load_runs(args.root)
    if not runs:
        print(f"summarize: no results.json with a 'run' section under {args.root}", file=sys.stderr)
        return 1
    metrics = choose_metrics(runs, args.metrics.split(",") if args.metrics else None)
    groups, duplicate_notes = group_runs(runs)
    rows = summarise(groups, metrics)
    if args.paired and not any(split_label(label)[0] == args.paired for label in groups):
        methods = sorted({split_label(label)[0] for label in groups})  # checked before anything is written
        print(f"summarize: --paired {args.paired}: no such method among the runs {methods}", file=sys.stderr)
        return 2
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, metrics, args.root, notes + duplicate_notes)
    (out / "summary.md").write_text(text)
    write_csv(out / "summary.csv", rows, metrics)
    robust_key = write_tradeoff(out / "tradeoff.png", rows, groups)
    print(text, end="")
    if args.paired:
        paired = paired_differences(groups, metrics, args.paired)
        paired_text = paired_markdown(paired, metrics, args.paired)
        (out / "paired.md").write_text(paired_text)
        write_paired_csv(out / "paired.csv", paired, metrics)
        print("\n" + paired_text, end="")
    print(
        f"\nwrote {out / 'summary.md'}, {out / 'summary.csv'}"
        + (
            f", {out / 'tradeoff.png'} (robust = {robust_key})"
            if robust_key
            else " (no trade-off plot: needs clean/acc and a robust accuracy)"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
