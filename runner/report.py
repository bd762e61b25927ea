"""report.md for one evaluation: a header that names the trained model (`runner.report_header`), every
metric grouped by its evaluator with the settings shared by the group shown once (`runner.report_tables`),
every check, the skipped evaluators, and the plots (`runner.plots`: robust accuracy against eps and
the common corruptions drawn here from the results; the reliability diagram by its evaluator).
Written by `evaluate` whenever a run directory is set, and again by whoever assembles results.json
(`write_report(run_dir, results, cfg, ...)`) so that the header can say what only the caller knows.
"""

import re
from pathlib import Path

from runner.methods import method_name
from runner.plots import (
    CORRUPTION_FILE,
    CURVE_FILE,
    RELIABILITY_FILE,
    write_corruption_plot,
    write_curve,
)
from runner.report_header import header_lines
from runner.report_tables import breakdown_lines, metric_tables, ordered_keys

REPORT_FILE = "report.md"
OTHER_PLOTS = {
    RELIABILITY_FILE: "Reliability diagram (calibration, clean and adversarial)",
    CORRUPTION_FILE: "Accuracy per common corruption (regenerated)",
}


def plot_title(cfg, out: dict, model_source: str | None) -> str:
    from omegaconf import OmegaConf

    run, train = out.get("run") or {}, out.get("train") or {}
    method = run.get("method") or method_name(cfg)
    seed = run.get("seed", OmegaConf.select(cfg, "seed", default=None))
    which = train.get("checkpoint")
    epoch = train.get("checkpoint_epoch")
    if which is None and model_source:
        which = model_source.split(",")[0].split("/")[-1].removesuffix(".pt")
        found = re.search(r"epoch (\d+)", model_source)
        epoch = int(found.group(1)) if found else None
    checkpoint = f"{which}.pt" if which in ("best", "last") else (Path(str(which)).name if which else "checkpoint")
    return f"{method}, seed {seed}, {checkpoint}" + (f" (epoch {epoch})" if epoch is not None else "")


def write_report(run_dir: Path, out: dict, cfg, model_source: str | None = None) -> Path:
    """Writes report.md (and robustness_curve.png / corruptions.png when there is data for them) into
    run_dir. `out`: evaluate's sections, or the whole results.json (its header is then complete)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, settings = out["metrics"], out["eval"]
    eval_threat = out.get("eval_threat") or {}
    threat_eps = eval_threat.get("eps")
    if threat_eps is None:
        from omegaconf import OmegaConf

        threat_eps = OmegaConf.select(cfg, "threat.eps", default=None)
    title = plot_title(cfg, out, model_source)
    curve = write_curve(run_dir, metrics, settings, float(threat_eps) if threat_eps is not None else None, title)
    if settings.get("corruption/mean_acc", {}).get("plot") == CORRUPTION_FILE:
        write_corruption_plot(run_dir, metrics, settings, title)
    headline, details = ordered_keys(metrics, settings)
    lines = header_lines(cfg, out, model_source, run_dir) + ["", "## Metrics"]
    lines += metric_tables(headline, metrics, settings, run_dir) if headline else ["", "(no metrics: suite `none`?)"]
    lines += ["", "## Checks", "", "| | check | detail |", "|---|---|---|"]
    for item in out["checks"]:
        mark = "skip" if item.get("skipped") else "pass" if item["passed"] else "**FAIL**"
        lines.append(f"| {mark} | {item['name']} | {str(item['detail']).replace('|', '/')} |")
    if out.get("skipped"):
        lines += ["", "## Skipped evaluators", ""]
        lines += [f"- `{s['evaluator']}`: {s['reason']}" for s in out["skipped"]]
    # Only plots this evaluation wrote (named in its settings), never a stale file from an earlier one.
    referenced = dict.fromkeys(s["plot"] for s in settings.values() if s.get("plot"))
    plots_shown = ([(CURVE_FILE, "Robust accuracy against eps")] if curve else []) + [
        (name, OTHER_PLOTS.get(name, name)) for name in referenced if (run_dir / name).exists()
    ]
    if plots_shown:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({name})\n" for name, title in plots_shown]
    if details:
        lines += ["", "## Breakdown"] + breakdown_lines(details, metrics, settings, run_dir)
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
