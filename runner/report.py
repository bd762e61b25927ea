"""report.md for one evaluation: every metric with its settings and 95% interval, every check, the
skipped evaluators, and the plots (robust accuracy against eps here; the reliability diagram and the
corruption bars come from their evaluators). Written by `evaluate` whenever a run directory is set.
"""

import json
import math
import re
import time
from pathlib import Path

CURVE_FILE = "robustness_curve.png"
REPORT_FILE = "report.md"
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
COLUMNS = ["attack", "norm", "eps", "eps_255", "steps", "restarts", "n_examples", "seed", "time_s"]
HIDDEN = set(COLUMNS) | {"ci95", "examples", "plot"}
CURVE_KEY = re.compile(r"^(pgd|autoattack)(?:/(linf|l2))?(?:/eps_([^/]+))?/acc$")
# Breakdowns (per condition, per class, per cascade stage) go below the headline table.
DETAIL_KEY = re.compile(r"^(corruption/.+/.+|class/\d+/.+|.*/after_[^/]+/acc)$")
OTHER_PLOTS = {
    "reliability.png": "Reliability diagram (calibration, clean and adversarial)",
    "corruptions.png": "Accuracy per common corruption (regenerated)",
}


def _short(value, limit: int = 70) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} items]"
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(settings: dict, column: str) -> str:
    value = settings.get(column)
    if value is None:
        return ""
    if column == "time_s":
        return f"{value:.1f}"
    if column == "eps":
        return f"{value:.4g}"
    return _short(value)


def metric_rows(metrics: dict, settings: dict, keys: list[str]) -> list[str]:
    header = (
        "| metric | value | 95% CI | "
        + " | ".join(COLUMNS)
        .replace("eps_255", "eps·255")
        .replace("n_examples", "n")
        .replace("time_s", "time (s)")
        + " | other settings |"
    )
    rows = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    for key in keys:
        s = settings.get(key, {})
        value = metrics[key]
        shown = f"{value:.4f}" if isinstance(value, float) else _short(value)
        ci = s.get("ci95")
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        other = "; ".join(f"{k}={_short(v)}" for k, v in s.items() if k not in HIDDEN)
        rows.append(
            f"| `{key}` | {shown} | {ci_text} | " + " | ".join(_cell(s, c) for c in COLUMNS) + f" | {other} |"
        )
    return rows


def ordered_keys(metrics: dict) -> tuple[list[str], list[str]]:
    headline = [k for k in CONTRACT if k in metrics]
    rest = [k for k in metrics if k not in headline]
    return headline + [k for k in rest if not DETAIL_KEY.match(k)], [k for k in rest if DETAIL_KEY.match(k)]


def curve_points(metrics: dict, settings: dict) -> dict:
    """{norm: {attack: [(eps, acc, ci)]}} from the attack evaluators' curve metrics."""
    curves: dict = {}
    for key, value in metrics.items():
        match = CURVE_KEY.match(key)
        s = settings.get(key, {})
        if not match or "eps" not in s:
            continue
        curves.setdefault(s.get("norm", "linf"), {}).setdefault(match.group(1), []).append(
            (float(s["eps"]), value, s.get("ci95"))
        )
    # Certified accuracy: one marker at its eps, the union of the bounds when there is one.
    certified = (
        ["certified/acc"]
        if "certified/acc" in metrics
        else [k for k in metrics if k.startswith("certified/") and k.endswith("/acc")]
    )
    for key in certified:
        value, s = metrics[key], settings.get(key, {})
        if "eps" in s:
            curves.setdefault(s.get("norm", "linf"), {}).setdefault(key.removesuffix("/acc"), []).append(
                (float(s["eps"]), value, s.get("ci95"))
            )
    return curves


def write_curve(run_dir: Path, metrics: dict, settings: dict, threat_eps: float | None) -> Path | None:
    """robustness_curve.png when some attack or certificate was measured at two or more eps (a curve);
    a single eps per metric is already in the report's table (and matplotlib costs ~0.5 s to load)."""
    curves = {
        norm: series
        for norm, series in curve_points(metrics, settings).items()
        if any(len({point[0] for point in points}) > 1 for points in series.values())
    }
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(curves), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    clean = metrics.get("clean/acc")
    for column, (norm, series) in enumerate(sorted(curves.items())):
        axes = figure.add_subplot(1, len(curves), column + 1)
        for name, points in sorted(series.items()):
            points = sorted(points)
            if clean is not None and name in ("pgd", "autoattack") and points[0][0] > 0:
                points = [(0.0, clean, settings.get("clean/acc", {}).get("ci95"))] + points
            eps = [p[0] for p in points]
            acc = [p[1] for p in points]
            low = [p[1] - p[2][0] if p[2] else 0 for p in points]
            high = [p[2][1] - p[1] if p[2] else 0 for p in points]
            style = "o-" if name in ("pgd", "autoattack") else "s"
            axes.errorbar(eps, acc, yerr=[low, high], fmt=style, capsize=3, label=name, markersize=4)
        if threat_eps is not None:
            axes.axvline(
                threat_eps, color="gray", linestyle=":", linewidth=1, label=f"threat eps {threat_eps:.4g}"
            )
        axes.set_xlabel(f"{norm} eps (pixel units in [0,1])")
        axes.set_ylabel("robust accuracy")
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(f"Robust accuracy against eps ({norm}); 95% intervals")
        axes.legend(fontsize=8)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CURVE_FILE
    figure.savefig(path, dpi=110)
    return path


def header_lines(cfg, out: dict, model_source: str | None = None) -> list[str]:
    from omegaconf import OmegaConf

    method = OmegaConf.select(cfg, "method.name", default=None) or "erm"
    eps = float(OmegaConf.select(cfg, "threat.eps", default=math.nan))
    n = OmegaConf.select(cfg, "eval.n_examples", default=None)
    lines = [
        f"# Evaluation report: {method} on {OmegaConf.select(cfg, 'dataset.name')}, "
        f"{OmegaConf.select(cfg, 'model.name')}",
        "",
        *([f"- model: {model_source}"] if model_source else []),
        f"- threat model: {OmegaConf.select(cfg, 'threat.norm')} eps={eps:.6g} ({eps * 255:.4g}/255)",
        f"- suite: `{OmegaConf.select(cfg, 'eval.name')}`; "
        f"evaluation seed {OmegaConf.select(cfg, 'eval.seed')}; "
        f"examples: {'the whole test split' if n is None else f'the first {n}'} in its fixed order "
        "(independent of every seed)",
        f"- checks: {sum(c['passed'] for c in out['checks'])} of {len(out['checks'])} passed",
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    if any(s.get("regenerated") for s in out["eval"].values()):
        lines.append(
            "- common corruptions: **regenerated** here with CIFAR-10-C constants (not the released "
            "-C files); compare only runs with the same corruption seed and examples"
        )
    return lines


def write_report(run_dir: Path, out: dict, cfg, model_source: str | None = None) -> Path:
    """Writes report.md (and robustness_curve.png when there is a curve) into run_dir."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, settings = out["metrics"], out["eval"]
    threat_eps = OmegaConf.select(cfg, "threat.eps", default=None)
    curve = write_curve(run_dir, metrics, settings, float(threat_eps) if threat_eps is not None else None)
    headline, details = ordered_keys(metrics)
    lines = header_lines(cfg, out, model_source) + ["", "## Metrics", ""]
    lines += metric_rows(metrics, settings, headline) if headline else ["(no metrics: suite `none`?)"]
    nested = [
        (k, name, v) for k in headline for name, v in settings.get(k, {}).items() if isinstance(v, dict)
    ]
    if nested:  # shortened in the table; in full here
        lines += ["", "Full nested settings:", ""]
        lines += [f"- `{k}` {name}: `{json.dumps(v, default=str)}`" for k, name, v in nested]
    lines += ["", "## Checks", "", "| | check | detail |", "|---|---|---|"]
    for item in out["checks"]:
        mark = "pass" if item["passed"] else "**FAIL**"
        lines.append(f"| {mark} | {item['name']} | {str(item['detail']).replace('|', '/')} |")
    if out.get("skipped"):
        lines += ["", "## Skipped evaluators", ""]
        lines += [f"- `{s['evaluator']}`: {s['reason']}" for s in out["skipped"]]
    # Only plots this evaluation wrote (named in its settings), never a stale file from an earlier one.
    referenced = dict.fromkeys(s["plot"] for s in settings.values() if s.get("plot"))
    plots = ([(CURVE_FILE, "Robust accuracy against eps")] if curve else []) + [
        (name, OTHER_PLOTS.get(name, name)) for name in referenced if (run_dir / name).exists()
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({name})\n" for name, title in plots]
    if details:
        lines += ["", "## Breakdown", ""] + metric_rows(metrics, settings, details)
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
