"""Summarise many runs into one table: method × metric, mean ± std over seeds.

    python scripts/summarize.py <sweep or outputs dir> [--out DIR] [--metrics clean/acc,pgd/acc] [--paired erm]

Reads every results.json below the directory (train runs and robust-eval runs alike), groups runs
that differ only in their seed, and writes summary.md, summary.csv, summary.tex (a booktabs table in
percent) and tradeoff.png (clean against robust accuracy: AutoAttack where measured, else PGD) into
--out (default: the directory itself). The markdown table is also printed.

A group is the runs whose resolved config (results.json's "config") is equal apart from `seed` and the
keys that cannot change a number (IGNORED_KEYS: logger, device, where the data lives, the evaluation
batch size...; robust-eval's `ckpt` path names the run like its seed, and the checkpoint it evaluated,
best or last, is compared instead). A group's label is its method plus whatever else differs between
groups (dataset, model, threat, label noise); groups that would still share a label get the config keys
that differ between them appended ("erm train.epochs=4 optimizer.lr=0.02"), so runs with different
settings are never averaged together. The same run evaluated twice (same group and seed) counts once:
the newest results.json wins, and the notes say so. Under every table a "Settings" list gives each
column's evaluator settings (attack, eps, steps, restarts, n, eval seed), the checkpoint evaluated and
the epochs trained, and says where runs differ. A run directory without results.json (still running,
failed or interrupted: its status.json) gets one line naming it.

`--paired METHOD` adds the comparison a single-seed table cannot make: each other method minus METHOD
on the seeds both ran (same data order, same initialisation), as the mean difference with its 95%
confidence interval (Student t over seeds) and on how many seeds the method was at least METHOD.
A group pairs with the METHOD group whose settings are equal apart from method.* and the checkpoint
evaluated (eval.checkpoint=auto: best for AT, last for ERM), or else apart from those and the keys either
method's config file sets as its recipe (IBP's optimizer, model, eval, epochs, batch size); the "differs"
column names every key besides method.* that differs. Written to
paired.md and paired.csv and printed after the main table.
"""

import argparse
import csv
import json
import math
import sys
import textwrap
from pathlib import Path

from runner.report import CONTRACT

# The contract's metrics first, in the report's order, when present in any run.
ROBUST_PREFERENCE = ["autoattack/acc", "pgd/acc", "certified/acc", "certified/ibp/acc"]
LABEL_FIELDS = ["dataset", "model", "threat", "label_noise"]
# Config keys (and everything below them) that cannot change a number. `ckpt` is robust-eval's path to
# the checkpoint: it names the run, like the seed; which checkpoint (best/last) is kept as eval.checkpoint.
IGNORED_KEYS = (
    "seed", "logger", "device", "resume", "train.progress", "train.log_every", "dataset.data_dir",
    "dataset.download", "eval.batch_size", "hydra", "ckpt",
)
# The order in which differing keys are appended to labels.
SECTION_ORDER = ["method", "train", "optimizer", "scheduler", "model", "dataset", "threat", "deterministic", "eval"]
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "runner" / "configs" / "method"
ABSENT = "none"


def find_results(root: Path) -> list[Path]:
    """Every results.json below root, except the earlier evaluations a run directory keeps in
    `earlier/<time>/` (a finished run evaluated again with another suite: the newest one is the run's)."""
    return sorted(p for p in root.rglob("results.json") if p.is_file() and p.parent.parent.name != "earlier")


def unfinished_runs(root: Path) -> list[str]:
    """One line per run directory with a status.json but no results.json (running, failed, interrupted)."""
    lines = []
    for status_path in sorted(root.rglob("status.json")):
        run_dir = status_path.parent
        if run_dir.parent.name == "earlier" or (run_dir / "results.json").exists():
            continue
        try:
            status = json.loads(status_path.read_text())
        except (OSError, json.JSONDecodeError):
            status = {}
        state = status.get("status", "unknown") if isinstance(status, dict) else "unknown"
        if state == "running":
            lines.append(f"not counted: {run_dir} is still running (no results.json yet)")
        else:
            error = status.get("error") if isinstance(status, dict) else None
            detail = f"status {state}: {error}" if error else f"status {state}"
            lines.append(f"not counted: {run_dir} has no results.json ({detail})")
    return lines


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


def erm_method_config() -> dict:
    """What `method: null` (no +method: plain ERM) means, so that it groups with `+method=erm`."""
    try:
        from dataclasses import asdict

        from runner.methods.erm import Config

        return asdict(Config())
    except Exception:  # noqa: BLE001 - an older runner: compare the name only
        return {"name": "erm"}


def flatten(value, prefix: str, out: dict) -> dict:
    """Dotted keys; eval.evaluators becomes eval.evaluators[<name>] (a marker "on") and its settings."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
        if not value and prefix:
            out[prefix] = "{}"
    elif prefix == "eval.evaluators" and isinstance(value, list) and all(
        isinstance(e, dict) and "name" in e for e in value
    ):
        for spec in value:
            name = str(spec["name"])
            key = f"eval.evaluators[{name}]"
            while key in out:  # the same evaluator twice
                key += "'"
            out[key] = "on"
            flatten({k: v for k, v in spec.items() if k != "name"}, key, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        out[prefix] = value
    return out


def ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in IGNORED_KEYS)


def checkpoint_name(train: dict) -> str | None:
    """best / last (a train run's train.checkpoint, or the file a robust-eval run evaluated)."""
    value = train.get("checkpoint")
    if not isinstance(value, str) or not value:
        return None
    return value if value in ("best", "last") else Path(value).name.removesuffix(".pt")


def run_settings(results: dict) -> tuple[dict, bool]:
    """The flat settings a group shares, and whether they come from the resolved config."""
    config = results.get("config")
    run = results["run"]
    if not isinstance(config, dict):  # an older results.json: what its run section says
        threat = run.get("threat") if isinstance(run.get("threat"), dict) else {}
        noise = run.get("label_noise") if isinstance(run.get("label_noise"), dict) else {}
        config = {
            "method": {"name": run.get("method")}, "dataset": {"name": run.get("dataset"),
            "label_noise": noise.get("fraction"), "label_noise_kind": noise.get("kind")},
            "model": {"name": run.get("model")}, "threat": {"norm": threat.get("norm"), "eps": threat.get("eps")},
        }
        return {k: v for k, v in flatten(config, "", {}).items() if v is not None}, False
    config = dict(config)
    if config.get("method") is None:
        config["method"] = erm_method_config()
    settings = {k: v for k, v in flatten(config, "", {}).items() if not ignored(k)}
    train = results.get("train") if isinstance(results.get("train"), dict) else {}
    evaluated = checkpoint_name(train)
    if evaluated is not None:  # eval.checkpoint=auto resolved; robust-eval's evaluated file
        settings["eval.checkpoint"] = evaluated
    return settings, True


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
        settings, from_config = run_settings(results)
        runs.append({
            "path": path, "run": run, "metrics": metrics if isinstance(metrics, dict) else {},
            "eval": results["eval"] if isinstance(results.get("eval"), dict) else {},
            "train": results["train"] if isinstance(results.get("train"), dict) else {},
            "settings": settings, "from_config": from_config, "mtime": path.stat().st_mtime,
        })
    return runs, notes


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
        for members in sets:
            label = base + suffix(members[0]["settings"], keys)
            n = 2
            while label in groups:  # cannot happen with the keys above; never pool silently anyway
                label = f"{base}{suffix(members[0]['settings'], keys)} #{n}"
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


# ---- settings under the tables -------------------------------------------------------------------------

def eps_text(norm, eps, eps_255=None) -> str:
    if not isinstance(eps, int | float):
        return ""
    text = f"{norm} eps {eps:g}" if norm else f"eps {eps:g}"
    if norm == "linf":
        text += f" = {eps_255 if isinstance(eps_255, int | float) else eps * 255:.4g}/255"
    return text


ATTACK_NAMES = {"pgd": "PGD", "autoattack": "AutoAttack", "none": "no attack"}


def eval_text(settings) -> str:
    """One evaluator's settings from results.json's eval section, in words."""
    if not isinstance(settings, dict) or not settings:
        return "settings not recorded"
    parts = []
    attack = settings.get("attack") or (f"{settings['verifier']} bounds" if settings.get("verifier") else None)
    if attack:
        name = ATTACK_NAMES.get(attack, str(attack))
        if settings.get("version"):
            name += f" version {settings['version']}"
        if settings.get("methods"):
            name += f" ({', '.join(map(str, settings['methods']))})"
        parts.append(name)
    eps = eps_text(settings.get("norm"), settings.get("eps"), settings.get("eps_255"))
    if eps:
        parts.append(eps)
    steps = settings.get("steps")
    if steps is not None:
        parts.append(f"{steps} steps" if isinstance(steps, int) else f"steps {steps}")
    if settings.get("restarts") is not None:
        parts.append(f"{settings['restarts']} restart{'s' if settings['restarts'] != 1 else ''}")
    if settings.get("n_examples") is not None:
        parts.append(f"n={settings['n_examples']}")
    if settings.get("seed") is not None:
        parts.append(f"eval seed {settings['seed']}")
    return ", ".join(parts) if parts else "settings not recorded"


def span(values: set) -> str:
    numbers = sorted(v for v in values if isinstance(v, int | float))
    if not numbers:
        return "?"
    return f"{numbers[0]:g}" if numbers[0] == numbers[-1] else f"{numbers[0]:g}–{numbers[-1]:g}"


def checkpoint_text(runs: list[dict]) -> str:
    names = sorted({checkpoint_name(r["train"]) or "?" for r in runs})
    epochs = set()
    for r in runs:
        epoch = r["train"].get("checkpoint_epoch")
        if epoch is None and r["train"].get("epochs_trained") is None:  # robust-eval: the checkpoint's epoch
            epoch = r["train"].get("epochs")
        epochs.add(epoch)
    if names == ["?"] and epochs == {None}:
        return "not recorded"
    epoch_text = span(epochs)
    return "/".join(f"{n}.pt" if n != "?" else "?" for n in names) + (
        "" if epoch_text == "?" else f" at epoch{'s' if '–' in epoch_text else ''} {epoch_text}"
    )


def epochs_text(runs: list[dict]) -> str:
    values = set()
    for r in runs:
        trained = r["train"].get("epochs_trained")
        if trained is None and r["from_config"]:
            trained = r["settings"].get("train.epochs")
        if trained is None:
            trained = r["train"].get("epochs")
        values.add(trained)
    return "not recorded" if values == {None} else span(values)


def by_value(items: list[tuple[str, str]]) -> dict:
    """{text: [labels]} in first-seen order, each label once."""
    out: dict = {}
    for label, text in items:
        labels = out.setdefault(text, [])
        if label not in labels:
            labels.append(label)
    return out


def settings_lines(groups: dict, labels: list[str], metrics: list[str]) -> list[str]:
    """The "Settings" list under a table: per metric column, then the checkpoint and the epochs."""
    lines = ["", "Settings:"]

    def line(name: str, values: dict, per_group: bool = False) -> str:
        if len(values) == 1:
            return f"- {name}: {next(iter(values))}"
        what = "per group" if per_group else "**differs between runs**"
        return f"- {name}: {what}: " + "; ".join(f"{text} ({', '.join(ls)})" for text, ls in values.items())

    for metric in metrics:
        items = [
            (label, eval_text(run["eval"].get(metric)))
            for label in labels
            for run in groups[label].values()
            if metric in run["metrics"]
        ]
        if items:
            lines.append(line(f"`{metric}`", by_value(items)))
    checkpoints = by_value([(label, checkpoint_text(list(groups[label].values()))) for label in labels])
    names = {text.split(" at ")[0] for text in checkpoints}
    lines.append(line("checkpoint evaluated", checkpoints, per_group=len(names) == 1))
    epochs = by_value([(label, epochs_text(list(groups[label].values()))) for label in labels])
    lines.append(line("epochs trained", epochs))
    return lines


# ---- paired ------------------------------------------------------------------------------------------

def t_quantile_975(dof: int) -> float:
    from scipy.stats import t  # scikit-learn's dependency; imported only when --paired asks for it

    return float(t.ppf(0.975, dof))


def group_method(groups: dict, label: str) -> str:
    return next(iter(groups[label].values()))["run"]["method"]


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


# ---- the main table ------------------------------------------------------------------------------------

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


# ---- the trade-off plot -------------------------------------------------------------------------------

def robust_axis_label(robust_key: str, runs: list[dict]) -> str:
    settings = [r["eval"].get(robust_key) for r in runs]
    settings = [s for s in settings if isinstance(s, dict)]
    name = {"autoattack/acc": "AutoAttack", "certified/acc": "certified", "certified/ibp/acc": "IBP-certified"}.get(
        robust_key, robust_key)
    if robust_key == "pgd/acc":
        steps = {s.get("steps") for s in settings}
        name = f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
    eps = {eps_text(s.get("norm"), s.get("eps"), s.get("eps_255")) for s in settings}
    eps.discard("")
    where = next(iter(eps)) if len(eps) == 1 else ("eps differs between groups" if eps else "eps not recorded")
    return f"{name} accuracy (%), {where}"


def write_tradeoff(path: Path, rows: list[dict], groups: dict) -> tuple[str | None, list[str]]:
    """Clean against robust accuracy (percent): one point per seed (faint) and the mean ± std per group.
    Returns the robust metric and the groups left out (no clean/acc or no robust metric), which the
    figure names under the axes."""
    robust_key = next((k for k in ROBUST_PREFERENCE if any(k in r["values"] for r in rows)), None)
    if robust_key is None or not any("clean/acc" in r["values"] for r in rows):
        return None, []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.2, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(rows))]
    omitted, plotted_runs = [], []
    for row, colour in zip(rows, colours):
        if "clean/acc" not in row["values"] or robust_key not in row["values"]:
            omitted.append(row["label"])
            continue
        runs = [
            r for r in groups[row["label"]].values() if "clean/acc" in r["metrics"] and robust_key in r["metrics"]
        ]
        plotted_runs += runs
        axes.scatter(
            [100 * r["metrics"]["clean/acc"] for r in runs], [100 * r["metrics"][robust_key] for r in runs],
            color=colour, alpha=0.35, s=18,
        )
        (cx, cs, _), (rx, rs, _) = row["values"]["clean/acc"], row["values"][robust_key]
        axes.errorbar(
            100 * cx,
            100 * rx,
            xerr=0 if math.isnan(cs) else 100 * cs,
            yerr=0 if math.isnan(rs) else 100 * rs,
            fmt="o",
            color=colour,
            capsize=3,
            label=textwrap.fill(f"{row['label']} (n={len(runs)})", 48, subsequent_indent="  "),
        )
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel(robust_axis_label(robust_key, plotted_runs))
    axes.set_title("Clean vs robust accuracy (mean ± std over seeds)")
    if omitted:
        figure.supxlabel(f"Not plotted (no clean/acc or {robust_key}): " + ", ".join(omitted), fontsize=7)
    figure.legend(loc="outside right center", fontsize=8)  # beside the axes: never over a point
    figure.savefig(path, dpi=110)
    return robust_key, omitted


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
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, metrics, args.root, unfinished + notes + group_notes, groups)
    (out / "summary.md").write_text(text)
    write_csv(out / "summary.csv", rows, metrics)
    table_settings = settings_lines(groups, [r["label"] for r in rows], metrics)
    write_tex(out / "summary.tex", rows, metrics, args.root, table_settings)
    robust_key, omitted = write_tradeoff(out / "tradeoff.png", rows, groups)
    print(text, end="")
    if args.paired:
        paired, paired_notes = paired_differences(groups, group_settings, metrics, args.paired)
        paired_text = paired_markdown(paired, metrics, args.paired, groups, paired_notes)
        (out / "paired.md").write_text(paired_text)
        write_paired_csv(out / "paired.csv", paired, metrics)
        print("\n" + paired_text, end="")
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


if __name__ == "__main__":
    sys.exit(main())
