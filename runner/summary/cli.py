"""The summarize command (scripts/summarize.py): reads the runs below a directory, writes summary.md/.csv/.tex,
tradeoff.png and with --paired paired.md/.csv, and prints the tables. main() returns the exit status: 0 when
written, 1 when there is no run to summarise, 2 for a bad argument (checked before anything is written)."""

import argparse
import sys
from pathlib import Path

from runner.summary.groups import group_method, group_runs, summarise
from runner.summary.paired import paired_differences, paired_markdown, write_paired_csv
from runner.summary.plot import write_tradeoff
from runner.summary.runs import load_runs, unfinished_runs
from runner.summary.settings import settings_lines
from runner.summary.tables import choose_metrics, markdown, write_csv, write_tex

DESCRIPTION = "Summarise many runs into one table: method × metric, mean ± std over seeds."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
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
    unfinished = unfinished_runs(args.root)
    if not runs:
        for line in unfinished:
            print(f"summarize: {line}", file=sys.stderr)
        print(f"summarize: no results.json with a 'run' section under {args.root}", file=sys.stderr)
        return 1
    metrics = choose_metrics(runs, args.metrics.split(",") if args.metrics else None)
    groups, group_settings, group_notes = group_runs(runs)
    rows = summarise(groups, metrics)
    methods = sorted({group_method(groups, label) for label in groups})
    if args.paired and args.paired not in methods:  # checked before anything is written
        print(f"summarize: --paired {args.paired}: no such method among the runs {methods}", file=sys.stderr)
        return 2
    out = args.out or args.root
    text = markdown(rows, metrics, args.root, unfinished + notes + group_notes, groups)
    print(text, end="")
    paired_text = None
    if args.paired:
        paired, paired_notes = paired_differences(groups, group_settings, metrics, args.paired)
        paired_text = paired_markdown(paired, metrics, args.paired, groups, paired_notes)
        print("\n" + paired_text, end="")
    try:  # the tables are printed first: an unwritable directory loses nothing the user asked to see
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(text)
        write_csv(out / "summary.csv", rows, metrics)
        table_settings = settings_lines(groups, [r["label"] for r in rows], metrics)
        write_tex(out / "summary.tex", rows, metrics, args.root, table_settings, groups)
        robust_key, omitted = write_tradeoff(out / "tradeoff.png", rows, groups)
        if paired_text is not None:
            (out / "paired.md").write_text(paired_text)
            write_paired_csv(out / "paired.csv", paired, metrics)
    except OSError as err:
        print(f"summarize: cannot write the tables into {out} ({err.strerror or err}): give a writable "
              "directory with --out DIR", file=sys.stderr)
        return 1
    print(
        f"\nwrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.tex'}"
        + (
            f", {out / 'tradeoff.png'} (robust = {robust_key})"
            if robust_key
            else " (no trade-off plot: needs clean/acc and a robust accuracy)"
        )
    )
    if omitted:
        print(f"tradeoff.png leaves out {len(omitted)} group(s) without clean/acc or {robust_key}: "
              + ", ".join(omitted))
    return 0
