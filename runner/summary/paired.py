"""The --paired comparison: each method minus a baseline method on the seeds both ran.

A group pairs with the baseline group whose settings are equal apart from method.* and the checkpoint
evaluated (eval.checkpoint=auto: best for AT, last for ERM), or else apart from those and the keys either
method's config file sets as its recipe (IBP's optimizer, model, eval, epochs, batch size). The result is
the mean difference with its 95% confidence interval (Student t over seeds) and on how many seeds the
method was at least the baseline, written as paired.md and paired.csv.
"""

import csv
import math
from pathlib import Path

from runner.summary.groups import ABSENT, format_value, group_method, key_order, mean_std
from runner.summary.runs import flatten
from runner.summary.settings import settings_lines

METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


def t_quantile_975(dof: int) -> float:
    from scipy.stats import t  # scikit-learn's dependency; imported only when --paired asks for it

    return float(t.ppf(0.975, dof))

def recipe_keys(method: str) -> list[str]:
    """The keys outside method.* that a method's config file sets (a `_global_` recipe: IBP's optimizer,
    model, eval, epochs...): a group of that method may differ from its baseline in those."""
    path = METHOD_CONFIGS / f"{method}.yaml"
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - no such file, or unreadable: no recipe
        return []
    if not isinstance(data, dict):
        return []
    keys = []
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for name in entry:
                name = str(name)
                if name.startswith("override /"):
                    keys.append(name.removeprefix("override /"))
    keys += [k for k in flatten({k: v for k, v in data.items() if k not in ("defaults", "method")}, "", {})]
    return keys


def covered(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in prefixes)


def differences(a: dict, b: dict, skip: list[str]) -> list[str]:
    keys = sorted((k for k in set(a) | set(b) if not covered(k, skip) and a.get(k, ABSENT) != b.get(k, ABSENT)),
                  key=key_order)
    return [f"{k} {format_value(a.get(k, ABSENT))} vs {format_value(b.get(k, ABSENT))}" for k in keys]


def find_baseline(groups: dict, settings: dict, label: str, baseline: str) -> tuple[str | None, list[str], str]:
    """(baseline group, what differs besides method.*, why none)."""
    candidates = [g for g in groups if group_method(groups, g) == baseline]
    # eval.checkpoint=auto is each method's own choice (best for AT, last for ERM): differs, shown, never blocks
    own = ["method", "eval.checkpoint"]
    exact = [g for g in candidates if not differences(settings[label], settings[g], own)]
    if len(exact) == 1:
        return exact[0], differences(settings[label], settings[exact[0]], ["method"]), ""
    if len(exact) > 1:
        return None, [], f"{len(exact)} {baseline} groups have its settings: " + ", ".join(exact)
    recipe = own + recipe_keys(group_method(groups, label)) + recipe_keys(baseline)
    close = [g for g in candidates if not differences(settings[label], settings[g], recipe)]
    if len(close) == 1:
        return close[0], differences(settings[label], settings[close[0]], ["method"]), ""
    if len(close) > 1:
        return None, [], f"{len(close)} {baseline} groups differ from it only in its recipe: " + ", ".join(close)
    return None, [], f"no {baseline} group has its settings apart from method.*"


def paired_differences(groups: dict, settings: dict, metrics: list[str], baseline: str) -> tuple[list, list]:
    """Per group and metric: differences to the baseline method's group of the same settings, seed by seed."""
    rows, notes = [], []
    for label in sorted(groups):
        if group_method(groups, label) == baseline:
            continue
        reference, differs, why = find_baseline(groups, settings, label, baseline)
        if reference is None:
            notes.append(f"{label}: not paired ({why})")
            continue
        row = {"label": label, "baseline": reference, "differs": differs, "values": {}}
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
    return rows, notes


def paired_markdown(rows: list[dict], metrics: list[str], baseline: str, groups: dict, notes: list[str]) -> str:
    lines = [
        f"## Paired against {baseline} (same seeds)",
        "",
        f"Mean of (method − {baseline}) over the seeds both ran, ± the 95% confidence half-width (Student t),",
        f"then on how many of those seeds the method scored at least {baseline}'s value. Groups pair when",
        "their settings are equal apart from method.*, the checkpoint each method's reference evaluates",
        "(eval.checkpoint=auto) and the keys a method's config file sets as its recipe (IBP's); the last",
        "column names every key besides method.* that differs, this method's value first.",
        "",
        "| method | against | " + " | ".join(f"`{m}`" for m in metrics) + " | differs besides method.* |",
        "|---|---|" + "---|" * len(metrics) + "---|",
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
        differs = "; ".join(row["differs"]) or "nothing"
        lines.append(f"| {row['label']} | {row['baseline']} | " + " | ".join(cells) + f" | {differs} |")
    if not rows:
        lines.append(f"\nNo group has a {baseline} group of the same settings to pair with.")
    else:
        labels = sorted({r["label"] for r in rows} | {r["baseline"] for r in rows})
        lines += settings_lines(groups, labels, metrics)
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_paired_csv(path: Path, rows: list[dict], metrics: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "baseline", "metric", "n_seeds", "mean_difference", "ci95", "at_least", "differs"])
        for row in rows:
            for metric in metrics:
                v = row["values"].get(metric)
                if v is not None:
                    ci = "" if math.isnan(v["ci95"]) else f"{v['ci95']:.6f}"
                    mean = f"{v['mean']:.6f}"
                    writer.writerow([row["label"], row["baseline"], metric, v["n"], mean, ci, v["at_least"],
                                     "; ".join(row["differs"])])
