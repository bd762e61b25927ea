"""report.md for one evaluation: a header that names the trained model (training seed, recipe, epochs,
checkpoint, software), every metric grouped by its evaluator with the settings shared by the group shown
once, every check, the skipped evaluators, and the plots (`runner.plots`: robust accuracy against eps and
the common corruptions drawn here from the results; the reliability diagram by its evaluator).
Written by `evaluate` whenever a run directory is set, and again by whoever assembles results.json
(`write_report(run_dir, results, cfg, ...)`) so that the header can say what only the caller knows.
"""

import json
import math
import re
import time
from pathlib import Path

from runner.plots import (
    CORRUPTION_FILE,
    CURVE_FILE,
    CURVE_KEY,
    RELIABILITY_FILE,
    write_corruption_plot,
    write_curve,
)

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
OTHER_PLOTS = {
    RELIABILITY_FILE: "Reliability diagram (calibration, clean and adversarial)",
    CORRUPTION_FILE: "Accuracy per common corruption (regenerated)",
}


# ---------------------------------------------------------------------------------------------- values


def threat_summary(norm: str, eps) -> dict:
    """results.json's threat: eps in [0,1] pixel units; eps_255 (the L-inf convention) for linf only."""
    eps = float(eps)
    return {"norm": norm, "eps": eps, "eps_255": round(eps * 255, 3) if norm == "linf" else None}


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def eps_255_text(value) -> str:
    """eps·255 rounded to 0.1 (6.375 -> 6.4, 8.0 -> 8)."""
    return f"{value:.1f}".removesuffix(".0")


def eps_text(norm: str | None, eps) -> str:
    if eps is None:
        return "eps unknown"
    text = f"eps={float(eps):.4g}"
    return text + (f" ({eps_255_text(float(eps) * 255)}/255)" if norm == "linf" else "")


def threat_text(threat: dict | None) -> str:
    if not isinstance(threat, dict):
        return "unknown"
    return f"{threat.get('norm')} {eps_text(threat.get('norm'), threat.get('eps'))}"


def _relative(text: str, run_dir: Path | None) -> str:
    """An absolute path shown relative to the run directory, or by its file name when outside it."""
    path = Path(text)
    if run_dir is not None:
        try:
            return str(path.resolve().relative_to(Path(run_dir).resolve()))
        except (ValueError, OSError):
            pass
    return path.name


def value_text(value, run_dir: Path | None = None) -> str:
    """A setting in full (never cut mid-token): numbers to 4 significant digits, lists comma-separated,
    mappings as key=value, absolute paths relative to the run directory."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return number(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(value_text(v, run_dir) for v in value) if value else "none"
    if isinstance(value, dict):
        if not value:
            return "none"
        return ", ".join(
            f"{k} ({value_text(v, run_dir)})" if isinstance(v, dict) else f"{k}={value_text(v, run_dir)}"
            for k, v in value.items()
        )
    text = str(value)
    if text.startswith("/") and " " not in text:
        text = _relative(text, run_dir)
    return text.replace("|", "\\|").replace("\n", " ")


def ci_text(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def metric_value_text(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else value_text(value)


# ---------------------------------------------------------------------------------------------- header


def recipe_text(method: dict | None, train_eps: float | None, norm: str | None) -> str:
    """The training method with what decides its robustness: e.g. "at: PGD-10 at 1.2 x eps = 0.12"."""
    if not isinstance(method, dict) or not method.get("name"):
        return "erm (plain training)"
    parts = []
    attack = method.get("attack")
    if isinstance(attack, dict):
        factor = attack.get("eps_factor", 1.0) or 1.0
        text = f"PGD-{attack.get('steps')}"
        if (attack.get("restarts") or 1) > 1:
            text += f" x {attack['restarts']} restarts"
        if train_eps is not None:
            text += (f" at {factor:g} x eps = {factor * train_eps:.4g}" if factor != 1
                     else f" at eps = {train_eps:.4g}") + (f" {norm}" if norm else "")
        if attack.get("alpha") is not None:
            text += f", step {attack['alpha']:.4g}"
        parts.append(text)
    elif "eps_factor" in method and train_eps is not None:  # certified training: its own ramp
        factor = method["eps_factor"]
        ramp = (f", ramp {method.get('ramp', '')} over {method['ramp_epochs']:g} epochs after "
                f"{method.get('warmup_epochs', 0):g} at eps 0" if "ramp_epochs" in method else "")
        parts.append(f"bounds at {factor:g} x eps = {factor * train_eps:.4g}{ramp}")
    for key in ("beta", "alpha", "r", "kappa"):
        if key in method and not isinstance(method[key], dict) and method[key] is not None:
            parts.append(f"{key}={value_text(method[key])}")
    if method.get("sam") or method.get("name") == "sam":
        parts.append(f"{'ASAM' if method.get('adaptive') else 'SAM'} rho={value_text(method.get('rho'))}")
    return f"{method['name']}: " + ", ".join(parts) if parts else method["name"]


def _software(env: dict) -> str:
    versions = env.get("versions") or {}
    git = env.get("git")
    dirty = env.get("git_dirty")
    commit = f"git {git[:10]}" + (", uncommitted changes" if dirty else "") if git else "git commit unknown"
    return (f"robust-train {versions.get('robust-train') or 'unknown'} ({commit}), "
            f"torch {env.get('torch') or 'unknown'}, python {env.get('python') or 'unknown'}, "
            f"device {env.get('device') or 'unknown'}")


def header_lines(cfg, out: dict, model_source: str | None = None, run_dir: Path | None = None) -> list[str]:
    """The compact block that says which model this is and how it was evaluated. `out` is results.json
    (or evaluate's part of it): its `run`, `train`, `train_config`, `env`, `train_env` and `eval_threat`
    sections are used where present, the config otherwise."""
    from omegaconf import OmegaConf

    def select(key, default=None):
        return OmegaConf.select(cfg, key, default=default)

    run, train, env = out.get("run") or {}, out.get("train") or {}, out.get("env") or {}
    train_config = out.get("train_config") or {}
    method_cfg = train_config.get("method") if train_config else None
    if method_cfg is None:
        node = select("method")
        method_cfg = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    method = run.get("method") or (method_cfg or {}).get("name") or "erm"
    eval_threat = out.get("eval_threat") or threat_summary(select("threat.norm"), select("threat.eps", math.nan))
    train_threat = run.get("threat") or eval_threat
    seed = run.get("seed", select("seed"))
    n = select("eval.n_examples")
    epochs = train.get("epochs", select("train.epochs"))
    trained = train.get("epochs_trained")
    ckpt_epoch = train.get("checkpoint_epoch")
    which = train.get("checkpoint")
    if model_source and (ckpt_epoch is None or which is None):  # written before results.json: the source says
        found = re.search(r"epoch (\d+)", model_source)
        ckpt_epoch = int(found.group(1)) if found and ckpt_epoch is None else ckpt_epoch
        named = re.match(r"^(best|last)\.pt\b", model_source)
        which = which or (named.group(1) if named else None)
    which = f"{which}.pt" if which in ("best", "last") else (_relative(which, run_dir) if which else "see model")
    epochs_text = (f"{trained} of {epochs} epochs trained" if trained is not None
                   else f"{epochs} epochs configured")
    if train.get("steps") is not None:
        epochs_text += f", {train['steps']} steps"
    if train.get("wall_time_s") is not None:
        epochs_text += f", {train['wall_time_s']:.1f} s"
    optimizer = train_config.get("optimizer") or {}
    if not optimizer and OmegaConf.is_config(select("optimizer")):
        optimizer = OmegaConf.to_container(select("optimizer"), resolve=True)
    batch = (train_config.get("train") or {}).get("batch_size", select("train.batch_size"))
    optim_text = (f"; {optimizer.get('name')} lr {number(optimizer.get('lr'))}, batch {batch}"
                  if optimizer.get("name") else "")
    lines = [
        f"# Evaluation report: {method} on {run.get('dataset') or select('dataset.name')}, "
        f"{run.get('model') or select('model.name')}",
        "",
        *([f"- model: {model_source}"] if model_source else []),
        f"- trained: training seed {seed}; {recipe_text(method_cfg, train_threat.get('eps'), train_threat.get('norm'))}"
        f"; threat {threat_text(train_threat)}{optim_text}",
        f"- training length: {epochs_text}; evaluated checkpoint: {which}"
        f" (epoch {ckpt_epoch if ckpt_epoch is not None else 'unknown'})",
    ]
    train_env = out.get("train_env")
    if train_env:
        lines.append(f"- trained with: {_software(train_env)}")
    elif "train_env" in out:
        lines.append("- trained with: unknown (the checkpoint does not record its software)")
    lines += [
        f"- evaluated with: {_software(env)}" if env else "- evaluated with: (software recorded in results.json)",
        f"- evaluation threat: {threat_text(eval_threat)}"
        + (" (**differs from the training threat**)" if _differs(train_threat, eval_threat) else ""),
        f"- suite: `{select('eval.name')}`; evaluation seed {select('eval.seed')}; "
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
    methods = ci_methods(out["eval"])
    if methods:
        lines.append("- 95% intervals: " + "; ".join(
            f"{method} ({', '.join(f'`{e}`' for e in evaluators)})" for method, evaluators in methods.items()
        ))
    return lines


def _differs(a: dict, b: dict) -> bool:
    return (a.get("norm"), a.get("eps")) != (b.get("norm"), b.get("eps"))


def ci_methods(settings: dict) -> dict:
    """{interval method: [evaluators using it]}, each method named once."""
    methods: dict = {}
    for key, s in settings.items():
        if s.get("ci95") and s.get("ci95_method"):
            evaluators = methods.setdefault(s["ci95_method"], [])
            if evaluator_of(key, s) not in evaluators:
                evaluators.append(evaluator_of(key, s))
    return methods


# ---------------------------------------------------------------------------------------------- tables


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


# ---------------------------------------------------------------------------------------------- plots


# ---------------------------------------------------------------------------------------------- report


def plot_title(cfg, out: dict, model_source: str | None) -> str:
    from omegaconf import OmegaConf

    run, train = out.get("run") or {}, out.get("train") or {}
    method = run.get("method") or OmegaConf.select(cfg, "method.name", default=None) or "erm"
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
        mark = "pass" if item["passed"] else "**FAIL**"
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
