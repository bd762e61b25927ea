"""`robust-eval`: evaluate an existing checkpoint with any suite, into a new run directory.

The checkpoint's own config (dataset, model, threat) is the base; the suite and whatever the user
overrode on the command line replace it. Checkpoints from before a suite existed work unchanged.
"""

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from runner import checkpoint, distributed
from runner.data import load_splits, to_float
from runner.errors import RunInterrupted
from runner.evaluate import environment, evaluate
from runner.methods import method_name
from runner.report_header import threat_summary
from runner.tracking import (
    NOT_RESUMABLE,
    StopRequests,
    Tracker,
    read_status,
    run_environment,
    run_state,
    write_json,
)

ALWAYS_FROM_COMMAND = ("eval", "device", "logger")
# What training decided: the checkpoint's values, never the command line's (results would carry another
# run's labels: `+method=at` on an ERM checkpoint). Where to find the data may change.
TRAINING_KEYS = ("method", "model", "dataset", "optimizer", "scheduler", "train", "seed", "deterministic", "resume")
EVAL_MAY_CHANGE = ("dataset.data_dir", "dataset.download")


def resolve_checkpoint(path) -> Path:
    """A run directory means the checkpoint its training evaluated (results.json's train.checkpoint), or
    else its best checkpoint (or last, when no best was written)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (*_evaluated_in(path), "best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.exists():
                return candidate
        raise checkpoint.CheckpointError(
            f"{str(path)!r} is a directory without checkpoints/best.pt or last.pt: not a run directory"
        )
    return path


def _evaluated_in(run_dir: Path) -> list[str]:
    try:
        which = json.loads((run_dir / "results.json").read_text())["train"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f"{which}.pt"] if which in ("best", "last") else []


def _describe_value(node) -> str:
    if isinstance(node, dict):
        return f"a {node.get('name', '?')} config" if "name" in node else "a mapping"
    return "none (plain ERM)" if node is None else repr(node)


def _first_difference(key: str, given, saved) -> tuple[str, str, str] | None:
    """(key, the command line's value, the checkpoint's) of the first leaf where they differ, or None."""
    if isinstance(given, dict) and isinstance(saved, dict):
        for sub in sorted(given, key=lambda k: (k != "name", str(k))):  # the name first: it says the most
            if sub in saved:
                found = _first_difference(f"{key}.{sub}", given[sub], saved[sub])
                if found:
                    return found
        return None
    if given == saved:
        return None
    if isinstance(given, dict) and "name" in given:
        return f"{key}.name", repr(given["name"]), _describe_value(saved)
    return key, _describe_value(given) if isinstance(given, dict) else repr(given), _describe_value(saved)


def check_training_keys(cfg, overrides: list[str], saved: dict, path) -> None:
    """Reject a command-line override of what the checkpoint was trained with (ConfigError, one line)."""
    from runner.errors import ConfigError

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0].split("/")[0] not in TRAINING_KEYS or key in EVAL_MAY_CHANGE:
            continue
        key = key.replace("/", ".")
        given = OmegaConf.select(cfg, key, default=None)
        given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else given
        node, present = saved, True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                present = False
                break
            node = node[part]
        if not present and not override.startswith("+"):  # a key older checkpoints lack: the command's
            continue
        found = _first_difference(key, given, node if present else None)
        if found is None:
            continue
        where, value, theirs = found
        trained = (f"{method_name(saved)}, "
                   f"{(saved.get('model') or {}).get('name', '?')}, {(saved.get('dataset') or {}).get('name', '?')}")
        raise ConfigError(
            f"{where}={value} (from {override!r}) differs from the checkpoint's {theirs}: checkpoint "
            f"{str(path)!r} holds a model trained as ({trained}), and robust-eval evaluates it with its own "
            f"training config; drop the override (eval.*, threat.*, device, dataset.data_dir and "
            f"dataset.download may change)"
        )


def merged_config(cfg, overrides: list[str], saved: dict):
    base = OmegaConf.create(saved)
    OmegaConf.set_struct(base, False)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    for key in set(ALWAYS_FROM_COMMAND) | keys:
        if key in ("ckpt",):
            continue
        OmegaConf.update(base, key, OmegaConf.select(cfg, key), merge=False)
    base.ckpt = cfg.ckpt
    return base


def check_model_fits(cfg, state: dict, path: Path, info):
    """The model the merged config builds, with the checkpoint's weights; ConfigError when they differ."""
    from runner.errors import ConfigError
    from runner.models import build_model

    model = build_model(cfg.model, info)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        saved = state.get("config", {})
        saved_model = saved.get("model", {}).get("name", "?")
        saved_data = saved.get("dataset", {}).get("name", "?")
        raise ConfigError(
            f"checkpoint {str(path)!r} holds a {saved_model} model for {saved_data}, which does not fit "
            f"model.name={cfg.model.name!r} on dataset.name={cfg.dataset.name!r} "
            f"({_first_line(err)}); drop the model/dataset overrides: the checkpoint carries its own config"
        ) from None
    return model


def _first_line(err) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])


def prepare(cfg, overrides: list[str]):
    """Read and check everything an evaluation needs, writing nothing: (checkpoint path, state,
    merged config, model with the checkpoint's weights)."""
    from runner.data import dataset_info
    from runner.validation import check_eval_command, check_eval_run

    check_eval_command(cfg)
    path = resolve_checkpoint(cfg.ckpt)
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise checkpoint.CheckpointError(
            f"{str(path)!r} has no model config or weights: not a model checkpoint"
        )
    check_training_keys(cfg, overrides, state["config"], path)
    cfg = merged_config(cfg, overrides, state["config"])
    check_eval_run(cfg)
    model = check_model_fits(cfg, state, path, dataset_info(cfg.dataset))
    return path, state, cfg, model


def training_threat(saved: dict) -> dict | None:
    """The threat the checkpoint was trained for (its config's), None when the config lacks one."""
    threat = saved.get("threat")
    if not isinstance(threat, dict) or threat.get("eps") is None:
        return None
    return threat_summary(threat.get("norm", "linf"), threat["eps"])


def _same_config(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def training_record(path: Path, state: dict) -> tuple[dict, dict | None]:
    """(results.json's `train` block, the training's `env` or None) for a checkpoint: what the checkpoint
    itself knows (its config, epoch; last.pt also steps and training time), completed from its run
    directory's results.json when that describes this very checkpoint (same config, checkpoint and
    epoch). A field nothing records is None."""
    saved = state.get("config") or {}
    epoch = state.get("epoch")
    resumable = "optimizer" in state  # last.pt: the training state, not only the model
    train = {
        "epochs": (saved.get("train") or {}).get("epochs"),
        "epochs_trained": epoch if resumable and not state.get("batch") else None,
        "wall_time_s": round(state["train_time_s"], 3) if resumable and "train_time_s" in state else None,
        "steps": state.get("step") if resumable else None,
        "checkpoint": path.stem if path.stem in ("best", "last") else str(path),
        "checkpoint_file": str(path),
        "checkpoint_epoch": epoch,
        "source": "checkpoint",
    }
    train_env = None
    results_file = path.parent.parent / "results.json" if path.parent.name == "checkpoints" else None
    try:
        trained = json.loads(results_file.read_text()) if results_file else None
    except (OSError, ValueError):
        trained = None
    if isinstance(trained, dict) and isinstance(trained.get("train"), dict) and _same_config(
        trained.get("config"), saved
    ):
        theirs = trained["train"]
        if theirs.get("checkpoint") == path.stem and theirs.get("checkpoint_epoch") == epoch:
            for key, value in theirs.items():
                if train.get(key) is None and key not in ("checkpoint", "checkpoint_file"):
                    train[key] = value
            train["source"] = f"checkpoint and {results_file}"
            train_env = trained.get("env") if isinstance(trained.get("env"), dict) else None
    if results_file is not None and not isinstance(trained, dict):  # a run's results come after its training
        status = read_status(results_file.parent)
        state = run_state(results_file.parent, status)
        # "trained": its training ended (an evaluation may have failed after it)
        if status.get("trained") is not True and state not in (None, "completed"):
            train["training_status"] = state
    return train, train_env


def unfinished_training(train: dict) -> str | None:
    """A warning when the checkpoint comes from a run directory whose training has not finished."""
    status = train.get("training_status")
    if status is None:
        return None
    epochs, epoch = train.get("epochs"), train.get("checkpoint_epoch")
    where = f"from epoch {epoch} of {epochs}" if epoch is not None and epochs is not None else "from its run"
    then = ("its training failed (its status.json has the error)" if status == "failed" else
            "run that robust-train command again to finish training")
    return (f"the checkpoint's training run has not finished (status {status!r}): this model is {where}, not "
            f"the final one; {then}")


def reevaluate(cfg, overrides: list[str], run_dir) -> dict:
    from runner.allocator import keep_freed_memory
    from runner.train import resolve_device, run_summary
    from runner.validation import check_writable_dir

    keep_freed_memory()
    distributed.share_cores_with_sibling_jobs()
    run_dir = Path(run_dir)
    path, state, cfg, model = prepare(cfg, overrides)
    check_writable_dir(run_dir, "hydra.run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    tracker = Tracker(run_dir, cfg, log_file="eval.log")
    tracker.status("running")
    # SIGTERM/SIGUSR1/Ctrl-C: stop now, status "interrupted"; an evaluation starts over when run again
    stop = StopRequests(hint=NOT_RESUMABLE, immediate="during the evaluation (no results were written)")
    exit_code = 1
    try:
        splits = load_splits(cfg.dataset)
        model.to(device)
        tracker.info(f"evaluating {path} with suite '{cfg.eval.name}'")
        start = time.perf_counter()
        saved = state["config"]
        eval_threat = threat_summary(cfg.threat.norm, cfg.threat.eps)
        train, train_env = training_record(path, state)
        unfinished = unfinished_training(train)
        if unfinished:
            tracker.warning(unfinished)
        # `run` describes the trained model (its training threat); the evaluation's threat is eval_threat.
        run = {**run_summary(cfg), "threat": training_threat(saved)}
        info = {"run": run, "train": train, "train_env": train_env, "train_config": saved,
                "eval_threat": eval_threat,
                "env": {**environment(device), **run_environment(cfg), "eval_seed": cfg.eval.seed}}
        results = {
            "run": run,
            "eval_threat": eval_threat,
            "train": train,
            **evaluate(model, cfg, to_float(splits.test[0]), splits.test[1], device, run_dir, str(path), info),
            "env": info["env"],
            "train_env": train_env,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "train_config": saved,
        }
        results["eval_wall_time_s"] = round(time.perf_counter() - start, 3)
        write_json(run_dir / "results.json", results)
        tracker.status("completed")
        exit_code = 0
        return results
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt | RunInterrupted)
        if not interrupted:
            tracker.to_log_file(f"FAILED: {type(err).__name__}: {err}")
        tracker.status("interrupted" if interrupted else "failed", error=f"{type(err).__name__}: {err}",
                       **({"resume": NOT_RESUMABLE} if interrupted else {}))
        raise
    finally:
        stop.close()
        tracker.finish(exit_code)



