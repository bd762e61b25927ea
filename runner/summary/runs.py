"""Finding and loading run results: every results.json below a directory (robust-train and robust-eval runs
alike), each with the flat settings that decide which runs may be averaged together, and the run
directories that have no results.json yet."""

import json
from pathlib import Path

from runner.tracking import read_status, run_state

# Config keys (and everything below them) that cannot change a number. `ckpt` is robust-eval's path to
# the checkpoint: it names the run, like the seed; which checkpoint (best/last) is kept as eval.checkpoint.
IGNORED_KEYS = (
    "seed", "logger", "device", "resume", "train.progress", "train.log_every", "dataset.data_dir",
    "dataset.download", "eval.batch_size", "hydra", "ckpt",
)


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
        status = read_status(run_dir)
        state = run_state(run_dir, status) or "unknown"
        if state == "running":
            lines.append(f"not counted: {run_dir} is still running (no results.json yet)")
        elif state == "killed":
            lines.append(f"not counted: {run_dir} was killed while running (status.json still says running and "
                         "no process holds the run); run its command again to resume from the last checkpoint")
        else:
            error = status.get("error")
            detail = f"status {state}: {error}" if error else f"status {state}"
            lines.append(f"not counted: {run_dir} has no results.json ({detail})")
    return lines

def method_defaults(name: str) -> dict:
    """The schema defaults of method `name` (what `method: null`, plain ERM, means when name is erm):
    a run written before a method key existed then groups with one that sets it to its default."""
    try:
        import importlib
        from dataclasses import asdict

        return asdict(importlib.import_module(f"runner.methods.{name}").Config())
    except Exception:  # noqa: BLE001 - an unknown or older method: compare what the run recorded
        return {"name": name}


def with_defaults(defaults: dict, recorded: dict) -> dict:
    merged = dict(defaults)
    for key, value in recorded.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        merged[key] = with_defaults(defaults[key], value) if nested else value
    return merged


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
    method = config.get("method")
    if method is None:
        config["method"] = method_defaults("erm")
    elif isinstance(method, dict) and method.get("name"):
        config["method"] = with_defaults(method_defaults(str(method["name"])), method)
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
        train = results.get("train") if isinstance(results.get("train"), dict) else {}
        if train.get("training_status"):
            notes.append(f"{path.parent}: evaluates a checkpoint of an unfinished training run (its status: "
                         f"{train['training_status']}, checkpoint epoch {train.get('checkpoint_epoch')} of "
                         f"{train.get('epochs')})")
        settings, from_config = run_settings(results)
        runs.append({
            "path": path, "run": run, "metrics": metrics if isinstance(metrics, dict) else {},
            "eval": results["eval"] if isinstance(results.get("eval"), dict) else {},
            "train": train,
            "eval_threat": results["eval_threat"] if isinstance(results.get("eval_threat"), dict) else None,
            "settings": settings, "from_config": from_config, "mtime": path.stat().st_mtime,
        })
    return runs, notes
