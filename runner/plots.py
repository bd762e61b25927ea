"""The plots of an evaluation: robust accuracy against eps (robustness_curve.png), accuracy per common
corruption (corruptions.png) and reliability diagrams (reliability.png). matplotlib is imported inside
each function: it costs ~0.5 s to load and most runs draw nothing.
"""

import re
from pathlib import Path

CURVE_FILE = "robustness_curve.png"
CORRUPTION_FILE = "corruptions.png"
RELIABILITY_FILE = "reliability.png"
CURVE_KEY = re.compile(r"^(pgd|autoattack)(?:/(linf|l2))?(?:/eps_([^/]+))?/acc$")
VERIFIERS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN", "union": "union"}


def attack_label(name: str, settings: dict) -> str:
    """A curve's legend entry with the settings that define it."""
    if name == "pgd":
        restarts = settings.get("restarts") or 1
        return f"PGD-{settings.get('steps', '?')}" + (f" x {restarts} restarts" if restarts > 1 else "")
    if name == "autoattack":
        return f"AutoAttack ({settings.get('version', 'standard')})"
    if name.startswith("certified"):
        verifier = settings.get("verifier") or name.split("/")[-1]
        if verifier == "union":
            methods = ", ".join(VERIFIERS.get(m, m) for m in settings.get("methods") or [])
            return f"certified (union of {methods})" if methods else "certified (union)"
        return f"certified ({VERIFIERS.get(verifier, verifier)})"
    return name


def curve_points(metrics: dict, settings: dict) -> dict:
    """{norm: {series: [(eps, acc, ci, settings)]}} from the attack evaluators' curve metrics."""
    curves: dict = {}
    for key, value in metrics.items():
        match = CURVE_KEY.match(key)
        s = settings.get(key, {})
        if not match or "eps" not in s:
            continue
        curves.setdefault(s.get("norm", "linf"), {}).setdefault(match.group(1), []).append(
            (float(s["eps"]), value, s.get("ci95"), s)
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
                (float(s["eps"]), value, s.get("ci95"), s)
            )
    return curves


def write_curve(run_dir: Path, metrics: dict, settings: dict, threat_eps: float | None,
                title: str | None = None) -> Path | None:
    """robustness_curve.png when some attack or certificate was measured at two or more eps (a curve);
    a single eps per metric is already in the report's table (and matplotlib costs ~0.5 s to load).
    A series measured at one eps is a marker, never a line (no line from the clean point either)."""
    curves = {
        norm: series
        for norm, series in curve_points(metrics, settings).items()
        if any(len({point[0] for point in points}) > 1 for points in series.values())
    }
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6 * len(curves), 4.3), layout="constrained")
    FigureCanvasAgg(figure)
    clean = metrics.get("clean/acc")
    markers = {"pgd": "o", "autoattack": "D"}
    for column, (norm, series) in enumerate(sorted(curves.items())):
        axes = figure.add_subplot(1, len(curves), column + 1)
        for name, points in sorted(series.items()):
            points = sorted(points, key=lambda p: p[0])
            is_curve = len({p[0] for p in points}) > 1
            if is_curve and clean is not None and name in ("pgd", "autoattack") and points[0][0] > 0:
                points = [(0.0, clean, settings.get("clean/acc", {}).get("ci95"), {})] + points
            eps = [p[0] for p in points]
            acc = [p[1] for p in points]
            low = [p[1] - p[2][0] if p[2] else 0 for p in points]
            high = [p[2][1] - p[1] if p[2] else 0 for p in points]
            marker = markers.get(name, "s")
            axes.errorbar(eps, acc, yerr=[low, high], fmt=f"{marker}-" if is_curve else marker, capsize=3,
                          label=attack_label(name, points[-1][3]), markersize=5 if is_curve else 7)
        if threat_eps is not None:
            axes.axvline(threat_eps, color="gray", linestyle=":", linewidth=1,
                         label=f"evaluation threat eps {threat_eps:.4g}")
        axes.set_xlabel(f"{norm} eps (pixel units in [0,1])")
        axes.set_ylabel("robust accuracy (eps 0: clean)")
        axes.set_ylim(-0.02, 1.02)
        axes.set_title((f"{title}\n" if title else "") + f"Robust accuracy against {norm} eps; 95% intervals",
                       fontsize=10)
        axes.legend(fontsize=8)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CURVE_FILE
    figure.savefig(path, dpi=110)
    return path


def write_corruption_plot(run_dir: Path, metrics: dict, settings: dict, title: str | None = None) -> Path | None:
    """corruptions.png from results: accuracy per corruption (mean over severities) with its 95% interval
    as error bars, the axis scaled to the data (said in the label when it does not start at 0)."""
    names = [k.split("/")[1] for k in metrics if re.match(r"^corruption/[^/]+/acc$", k)
             and not re.match(r"^corruption/sev\d+/acc$", k)]
    if not names:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.5, 0.6 * len(names) + 2.5), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    acc = [metrics[f"corruption/{n}/acc"] for n in names]
    cis = [settings.get(f"corruption/{n}/acc", {}).get("ci95") for n in names]
    low = [a - c[0] if c else 0 for a, c in zip(acc, cis)]
    high = [c[1] - a if c else 0 for a, c in zip(acc, cis)]
    # Points, not bars: the axis is scaled to the data, and a bar's length would mislead from a non-zero base.
    axes.errorbar(range(len(names)), acc, yerr=[low, high], fmt="o", capsize=4, color="tab:blue",
                  markersize=6, label="accuracy (mean over severities), 95% CI")
    axes.grid(axis="y", alpha=0.3)
    values = acc + [a + h for a, h in zip(acc, high)] + [a - lo for a, lo in zip(acc, low)]
    clean = metrics.get("clean/acc")
    if clean is not None:
        axes.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean {clean:.3f}")
        values.append(clean)
    mean = metrics.get("corruption/mean_acc")
    if mean is not None:
        axes.axhline(mean, color="tab:orange", linestyle=":", linewidth=1.2, label=f"mean {mean:.3f}")
    span = max(values) - min(values)
    bottom = max(0.0, min(values) - max(0.05, 0.3 * span))
    top = min(1.0, max(values) + max(0.03, 0.25 * span))
    axes.set_ylim(bottom, top)
    axes.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=35, ha="right",
                    fontsize=9)
    axes.set_ylabel("accuracy" + (f" (axis from {bottom:.2f}, not 0)" if bottom > 0 else ""))
    axes.set_title((f"{title}: " if title else "") + "common corruptions (regenerated)", fontsize=10)
    axes.legend(fontsize=8, loc="best", framealpha=0.9)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CORRUPTION_FILE
    figure.savefig(path, dpi=120)
    return path


def write_reliability(run_dir: Path, panels: list[tuple[str, dict]], bins: int,
                      intervals: list | None = None) -> Path:
    """reliability.png, one diagram per condition: accuracy per confidence bin against the diagonal, the
    points per bin as light bars on a secondary axis, ECE and its 95% interval in the title. `panels`:
    [(title, calibration.bin_statistics(...))]; `intervals`: the ECE intervals in the same order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    width = 1.0 / bins
    centres = [(i + 0.5) * width for i in range(bins)]
    for column, (title, stats) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), column + 1)
        counts = [float(c) for c in stats["count"].tolist()]
        filled = [i for i in range(bins) if counts[i] > 0]
        counts_axis = axes.twinx()
        counts_axis.plot([centres[i] for i in filled], [counts[i] for i in filled], "o:", color="dimgray",
                         markersize=3, linewidth=0.8, alpha=0.8)
        counts_axis.set_ylim(0, max(counts) * 4 if max(counts) > 0 else 1)  # the lowest quarter
        counts_axis.set_ylabel("points per bin (grey dots, right axis)", color="dimgray", fontsize=8)
        counts_axis.tick_params(axis="y", labelcolor="dimgray", labelsize=7)
        axes.bar([centres[i] for i in filled], [stats["accuracy"][i].item() for i in filled], width * 0.9,
                 edgecolor="black", linewidth=0.5, color="tab:blue", alpha=0.8, label="accuracy in bin")
        axes.scatter([centres[i] for i in filled], [stats["confidence"][i].item() for i in filled],
                     marker="_", s=300, color="tab:red", zorder=3, label="mean confidence in bin")
        axes.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence (top softmax probability)")
        axes.set_ylabel("accuracy")
        ci = intervals[column] if intervals and column < len(intervals) else None
        ece = f"ECE {stats['ece']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        axes.set_title(f"{title}\n{ece}, n={int(sum(counts))}", fontsize=10)
        axes.legend(loc="upper left", fontsize=8)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RELIABILITY_FILE
    figure.savefig(path, dpi=110)
    return path
