"""Grouping runs into settings groups, and each group's mean ± std over seeds.

A group is the runs whose settings (runs.run_settings) are equal: runs that differ only in their seed, or
in keys that cannot change a number. A group's label is its method plus whatever else differs between
groups (dataset, model, threat, label noise); groups that would still share a label get the config keys
that differ between them appended ("erm train.epochs=4 optimizer.lr=0.02"), so runs with different
settings are never averaged together. The same run evaluated twice (same group and seed) counts once:
the newest results.json wins, and the notes say so.
"""

import json
import math

# The run fields a label names when they differ between groups.
LABEL_FIELDS = ["dataset", "model", "threat", "label_noise"]
# The order in which differing keys are appended to labels.
SECTION_ORDER = ["method", "train", "optimizer", "scheduler", "model", "dataset", "threat", "deterministic", "eval"]
# How a key a group does not have shows in labels and differences.
ABSENT = "none"


def describe(value) -> str:
    if isinstance(value, dict):
        if "norm" in value and "eps" in value:
            return f"{value['norm']} eps={value['eps']:.4g}"
        if "fraction" in value:
            return f"noise={value['fraction']:g}" + (f" {value.get('kind')}" if value.get("fraction") else "")
        return json.dumps(value, sort_keys=True)
    return str(value)


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)

def key_order(key: str) -> tuple:
    section = key.split(".")[0].split("[")[0]
    return (SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER), key)


def differing_keys(settings: list[dict]) -> list[str]:
    keys = set().union(*settings)
    return sorted((k for k in keys if len({json.dumps(s.get(k, ABSENT)) for s in settings}) > 1), key=key_order)


def suffix(settings: dict, keys: list[str]) -> str:
    """` key=value` for the keys that differ; an absent key shows as `key=none` unless a parent key of it
    (an evaluator) is itself shown absent, and a present marker only when none of its keys is shown."""
    def parent_of(child: str, parent: str) -> bool:
        return child.startswith(parent + ".") or child.startswith(parent + "[")

    shown = []
    for key in keys:
        if key not in settings:
            if not any(parent_of(key, p) and p not in settings for p in keys):
                shown.append(f"{key}={ABSENT}")
        elif settings[key] == "on" and any(parent_of(k, key) and k in settings for k in keys):
            continue
        else:
            shown.append(f"{key}={format_value(settings[key])}")
    return "".join(f" {s}" for s in shown)


def label_keys(keys: list[str]) -> list[str]:
    """The differing keys a label shows: when the suites differ (eval.name), their evaluators' settings
    follow from the suite's name and stay in the notes, not in every label."""
    if "eval.name" not in keys:
        return keys
    return [k for k in keys if not k.startswith("eval.evaluators")]


def group_runs(runs: list[dict]) -> tuple[dict, dict, list[str]]:
    """({label: {seed: run}}, {label: settings}, notes). Runs group when their settings are equal; the label
    names the method and whatever else varies between runs, and the config keys that tell apart groups
    that would otherwise share a label."""
    varying = [f for f in LABEL_FIELDS if len({describe(r["run"].get(f)) for r in runs}) > 1]
    by_settings: dict = {}
    for run in runs:
        key = json.dumps(sorted(run["settings"].items()), default=str)
        by_settings.setdefault(key, []).append(run)
    by_base: dict = {}
    for members in by_settings.values():
        info = members[0]["run"]
        base = info["method"] + "".join(
            f" {describe(info.get(f))}" if f != "dataset" and f != "model" else f" {info.get(f)}"
            for f in varying
        )
        by_base.setdefault(base, []).append(members)
    groups: dict = {}
    group_settings: dict = {}
    notes = []
    for base in sorted(by_base):
        sets = by_base[base]
        keys = differing_keys([m[0]["settings"] for m in sets]) if len(sets) > 1 else []
        if keys:
            notes.append(
                f"{len(sets)} groups of '{base}' runs differ in settings, so each has its own row: "
                + ", ".join(f"`{k}`" for k in keys)
            )
        shown = label_keys(keys)
        if len({suffix(m[0]["settings"], shown) for m in sets}) < len(sets):
            shown = keys  # the suite's name alone does not tell these groups apart
        for members in sets:
            label = base + suffix(members[0]["settings"], shown)
            n = 2
            while label in groups:  # the keys shown still tell them apart; never pool silently anyway
                label = f"{base}{suffix(members[0]['settings'], shown)} #{n}"
                n += 1
            seeds = groups.setdefault(label, {})
            group_settings[label] = members[0]["settings"]
            for run in sorted(members, key=lambda r: r["mtime"]):
                seed = run["run"].get("seed")
                if seed in seeds:
                    notes.append(
                        f"{label} seed {seed}: {seeds[seed]['path']} and {run['path']} are the same run; "
                        f"using the newest, {run['path']}"
                    )
                seeds[seed] = run
    return groups, group_settings, notes

def group_method(groups: dict, label: str) -> str:
    return next(iter(groups[label].values()))["run"]["method"]

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
