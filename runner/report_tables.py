"""The metric tables of report.md: metrics ordered and grouped by the evaluator that wrote them, the
settings a group's rows share shown once above its table and the ones that differ as columns, and the
breakdowns (accuracy per corruption and severity, per class) in matrices of their own.
"""

import json
import math
import re
from pathlib import Path

from runner.plots import CURVE_KEY
from runner.report_values import ci_text, eps_255_text, metric_value_text, value_text

# The contract's headline metrics first, in this order; every other metric follows.
CONTRACT = [
    "clean/acc",
    "pgd/acc",
    "autoattack/acc",
    "certified/ibp/acc",
    "certified/crown/acc",
    "corruption/mean_acc",
    "calibration/ece",
    "class/worst_acc",
]
# Suite order when a metric's settings do not name their evaluator (results written before they did).
EVALUATOR_ORDER = ["clean", "pgd", "autoattack", "certified", "corruptions", "calibration", "per_class", "sanity"]
PREFIX_EVALUATOR = {"corruption": "corruptions", "class": "per_class"}
# Settings shown as table columns, in this order, when they differ between a group's rows.
COLUMN_ORDER = ["attack", "verifier", "norm", "eps", "eps_255", "steps", "restarts", "alpha", "n_examples", "seed"]
COLUMN_TITLES = {"eps_255": "eps·255", "n_examples": "n", "seed": "eval seed", "time_s": "time (s)"}
NOT_SETTINGS = {"ci95", "examples", "plot", "time_s", "evaluator"}
# Breakdowns (per condition, per class, per cascade stage) go below the headline tables.
DETAIL_KEY = re.compile(r"^(corruption/.+/.+|class/\d+/.+|.*/after_[^/]+/acc)$")
CONDITION_KEY = re.compile(r"^corruption/([^/]+)/sev(\d+)/acc$")


def evaluator_of(key: str, settings: dict) -> str:
    return settings.get("evaluator") or PREFIX_EVALUATOR.get(key.split("/")[0], key.split("/")[0])


def _eps_of(settings: dict) -> float:
    eps = settings.get("eps")
    return float(eps) if isinstance(eps, int | float) else math.inf


def ordered_keys(metrics: dict, settings: dict | None = None) -> tuple[list[str], list[str]]:
    """(headline keys, breakdown keys), each grouped by evaluator in suite order; within an evaluator
    an attack's metrics at several eps in eps order, then the others in the order the evaluator gave."""
    settings = settings or {}
    suite = list(dict.fromkeys(evaluator_of(k, settings.get(k, {})) for k in metrics))
    rank = {name: i for i, name in enumerate(suite)}
    position = {key: i for i, key in enumerate(metrics)}

    def order(key):  # evaluator; its curve (attack at several eps) by eps; the rest in the evaluator's order
        s = settings.get(key, {})
        curve = bool(CURVE_KEY.match(key))
        return rank[evaluator_of(key, s)], not curve, _eps_of(s) if curve else 0.0, position[key]

    keys = sorted(metrics, key=order)
    return [k for k in keys if not DETAIL_KEY.match(k)], [k for k in keys if DETAIL_KEY.match(k)]


def _groups(keys: list[str], settings: dict) -> dict:
    groups: dict = {}
    for key in keys:
        groups.setdefault(evaluator_of(key, settings.get(key, {})), []).append(key)
    return groups


def shared_and_varying(keys: list[str], settings: dict) -> tuple[dict, list[str]]:
    """Settings identical in every row of a group (shown once) and those that differ (columns)."""
    names = list(dict.fromkeys(n for k in keys for n in settings.get(k, {}) if n not in NOT_SETTINGS))
    shared, varying = {}, []
    for name in names:
        rows = [k for k in keys if settings.get(k, {}).get("ci95")] if name == "ci95_method" else keys
        values = [json.dumps(settings.get(k, {}).get(name), sort_keys=True, default=str) for k in rows or keys]
        if len(set(values)) == 1:
            shared[name] = settings.get((rows or keys)[0], {}).get(name)
        else:
            varying.append(name)
    varying.sort(key=lambda n: (COLUMN_ORDER.index(n) if n in COLUMN_ORDER else len(COLUMN_ORDER), names.index(n)))
    return shared, varying


def _columns_and_notes(keys: list[str], varying: list[str], settings: dict) -> tuple[list[str], list[str]]:
    """Varying settings as columns, except those only one row of several has (that row's notes)."""
    def rows_with(name):
        return sum(settings.get(k, {}).get(name) is not None for k in keys)

    notes = [n for n in varying if len(keys) > 2 and rows_with(n) == 1 and n not in COLUMN_ORDER]
    return [n for n in varying if n not in notes], notes


def _setting_label(name: str) -> str:
    return COLUMN_TITLES.get(name, name)


def shared_text(shared: dict, run_dir: Path | None) -> str:
    parts = []
    for name, value in shared.items():
        if value is None or name == "eps_255" and shared.get("norm") != "linf":
            continue
        if name == "eps_255":
            parts.append(f"eps·255={eps_255_text(value)}")
        elif name == "ci95_method":
            parts.append(f"95% CI: {value}")
        else:
            parts.append(f"{_setting_label(name)}={value_text(value, run_dir)}")
    return "; ".join(parts)


def _cell(settings: dict, name: str, run_dir: Path | None) -> str:
    value = settings.get(name)
    if value is None:
        return ""
    if name == "eps_255":
        return eps_255_text(value)
    return value_text(value, run_dir)


def group_table(keys: list[str], metrics: dict, settings: dict, run_dir: Path | None) -> list[str]:
    """A table of one evaluator's metrics: the settings its rows share in one line above it, the ones
    that differ as columns."""
    shared, varying = shared_and_varying(keys, settings)
    varying, notes = _columns_and_notes(keys, varying, settings)
    times = any(settings.get(k, {}).get("time_s") is not None for k in keys)
    columns = varying + (["time_s"] if times else [])
    lines = [f"Settings: {shared_text(shared, run_dir)}", ""] if shared_text(shared, run_dir) else []
    header = ["metric", "value", "95% CI"] + [_setting_label(c) for c in columns] + (["notes"] if notes else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        s = settings.get(key, {})
        cells = [f"`{key}`", metric_value_text(metrics[key]), ci_text(s.get("ci95"))]
        cells += [f"{s['time_s']:.1f}" if c == "time_s" and s.get(c) is not None else _cell(s, c, run_dir)
                  for c in columns]
        if notes:
            cells.append("; ".join(f"{n}={value_text(s[n], run_dir)}" for n in notes if s.get(n) is not None))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


CLASS_KEY = re.compile(r"^class/(\d+)/(.+)$")


def class_matrix(keys: list[str], metrics: dict, settings: dict, run_dir: Path | None) -> tuple[list[str], list]:
    """Per-class metrics as one row per class, one column (value and 95% CI) per metric kind, each kind's
    shared settings once above; returns (lines, keys shown)."""
    cells: dict = {}
    for key in keys:
        match = CLASS_KEY.match(key)
        if match:
            cells.setdefault(match.group(2), {})[int(match.group(1))] = key
    if not cells:
        return [], []
    lines = []
    for kind, by_class in cells.items():
        shared, _ = shared_and_varying(list(by_class.values()), settings)
        shared = {k: v for k, v in shared.items() if k not in ("class", "n_examples")}
        text = shared_text(shared, run_dir)
        if text:
            lines.append(f"Settings of `{kind}`: {text}")
    lines.append("")
    kinds = list(cells)
    header = ["class", "n"] + [f"{kind} [95% CI]" for kind in kinds]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in sorted({c for by_class in cells.values() for c in by_class}):
        first = next(cells[k][label] for k in kinds if label in cells[k])
        row = [str(label), value_text(settings.get(first, {}).get("n_examples", ""))]
        for kind in kinds:
            key = cells[kind].get(label)
            row.append(f"{metrics[key]:.4f} {ci_text(settings.get(key, {}).get('ci95'))}".strip() if key else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines, [k for by_class in cells.values() for k in by_class.values()]


def metric_tables(keys: list[str], metrics: dict, settings: dict, run_dir: Path | None) -> list[str]:
    lines = []
    for evaluator, group in _groups(keys, settings).items():
        lines += ["", f"### {evaluator}", ""] + group_table(group, metrics, settings, run_dir)
    return lines


def corruption_matrix(keys: list[str], metrics: dict, settings: dict) -> tuple[list[str], list[str]]:
    """Accuracy per corruption (rows) and severity (columns) with the mean over severities and its CI;
    returns (lines, keys shown)."""
    cells, shown = {}, []
    for key in keys:
        match = CONDITION_KEY.match(key)
        if match:
            cells[match.group(1), int(match.group(2))] = metrics[key]
            shown.append(key)
    if not cells:
        return [], []
    names = list(dict.fromkeys(name for name, _ in cells))
    severities = sorted({s for _, s in cells})
    extra = [c for c in ("ce", "relative_ce") if any(f"corruption/{n}/{c}" in metrics for n in names)]
    header = ["corruption"] + [f"sev {s}" for s in severities] + ["mean", "95% CI"] + extra
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        mean_key = f"corruption/{name}/acc"
        row = [name] + [f"{cells[name, s]:.4f}" if (name, s) in cells else "" for s in severities]
        row += [f"{metrics[mean_key]:.4f}" if mean_key in metrics else "",
                ci_text(settings.get(mean_key, {}).get("ci95"))]
        row += [f"{metrics[f'corruption/{name}/{c}']:.4f}" if f"corruption/{name}/{c}" in metrics else ""
                for c in extra]
        shown += [k for k in (mean_key, *(f"corruption/{name}/{c}" for c in extra)) if k in metrics]
        lines.append("| " + " | ".join(row) + " |")
    severity_keys = [f"corruption/sev{s}/acc" for s in severities]
    if any(k in metrics for k in severity_keys):
        overall = metrics.get("corruption/mean_acc")
        row = ["**mean**"] + [f"{metrics[k]:.4f}" if k in metrics else "" for k in severity_keys]
        row += [f"{overall:.4f}" if overall is not None else "",
                ci_text(settings.get("corruption/mean_acc", {}).get("ci95"))] + [""] * len(extra)
        lines.append("| " + " | ".join(row) + " |")
        shown += [k for k in severity_keys if k in metrics]
    return lines, shown


def breakdown_lines(keys: list[str], metrics: dict, settings: dict, run_dir: Path | None) -> list[str]:
    lines = []
    for evaluator, group in _groups(keys, settings).items():
        lines += ["", f"### {evaluator}", ""]
        matrix, shown = class_matrix(group, metrics, settings, run_dir)
        if matrix:
            lines += matrix
            group = [k for k in group if k not in shown]
            if group:
                lines.append("")
        matrix, shown = corruption_matrix(group, metrics, settings)
        if matrix:
            shared, _ = shared_and_varying(shown, settings)
            shared = {k: v for k, v in shared.items() if k not in ("corruption", "severity", "severities")}
            text = shared_text(shared, run_dir)
            lines += ([f"Settings: {text}", ""] if text else []) + matrix
            group = [k for k in group if k not in shown]
            if group:
                lines.append("")
        if group:
            lines += group_table(group, metrics, settings, run_dir)
    return lines


def metric_rows(metrics: dict, settings: dict, keys: list[str], run_dir: Path | None = None) -> list[str]:
    """The tables for `keys`, grouped by evaluator (kept for callers of the flat table)."""
    return metric_tables(keys, metrics, settings, run_dir)
