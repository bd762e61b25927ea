"""`run(cfg, run_dir)`: train, select, evaluate, write the run directory. One flat loop, top to bottom.

The loop never names a method: it asks the method for a loss (through the update rule, which may be
SAM) and for validation metrics. Resuming is exact because everything random in an epoch is seeded
from (seed, epoch) and every epoch ends with an atomic checkpoint of all state. SIGTERM/SIGUSR1 write a
mid-epoch checkpoint (global RNG state + batch index; the loader's order is a function of (seed, epoch),
so its first batches are replayed and skipped) and stop; SIGKILL loses at most the epoch in progress.
"""

import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from runner import checkpoint, distributed
from runner.allocator import keep_freed_memory
from runner.collapse import CollapseGuard
from runner.data import InMemoryLoader, load_splits, to_float
from runner.errors import NonFiniteLoss, RunInterrupted
from runner.evaluate import environment, evaluate
from runner.methods import build_method, method_name
from runner.methods.base import StepContext
from runner.models import build_model
from runner.optim import build_optimizer, build_scheduler
from runner.report_header import threat_summary
from runner.tracking import (
    StopRequests,
    Tracker,
    keep_earlier_results,
    lock_run_dir,
    read_status,
    run_environment,
    write_json,
)
from runner.update import build_update, describe_update
from runner.validation import check_device, check_run, check_writable_dir


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def epoch_seed(seed: int, epoch: int) -> int:
    """The global RNG seed of one epoch (attack starts, dropout): a resumed epoch replays identically."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


def run_summary(cfg) -> dict:
    return {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "method": method_name(cfg), "seed": cfg.seed,
        "threat": threat_summary(cfg.threat.norm, cfg.threat.eps),
        "label_noise": {"fraction": cfg.dataset.label_noise, "kind": cfg.dataset.label_noise_kind},
        "train_fraction": cfg.dataset.train_fraction,
        "update": describe_update(cfg),
    }


def model_checkpoint(cfg, model, extra: dict | None = None, config: dict | None = None) -> dict:
    """What load_model needs: the weights and the config that builds the architecture (`config`: the
    resolved container of `cfg` when the caller already has it, as the training loop does)."""
    if config is None:
        config = OmegaConf.to_container(cfg, resolve=True)
    return {"config": config, "model": model.state_dict(), **(extra or {})}


def selection_key(val) -> list[float]:
    """What best.pt maximises: the method's validation score, then clean validation accuracy (a small
    validation split ties often on the score; the earlier epoch keeps a full tie). `val`: an epoch's
    metrics, or a stored key (a bare float in checkpoints written before the tie-break)."""
    if isinstance(val, dict):
        return [float(val["val/score"]), float(val.get("val/clean_acc", val["val/score"]))]
    return list(val) if isinstance(val, (list, tuple)) else [float(val), -1.0]


def rng_state() -> dict:
    """The CPU generator's state and, on a GPU, this process's device's only (`distributed.setup` makes the
    run's device current): one state per visible GPU would not restore where fewer GPUs are visible."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    # A GPU run has put its model on the device by now; a CPU run leaves CUDA uninitialised (and unused).
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        device, cuda = torch.cuda.current_device(), state["cuda"]
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per GPU visible when saved
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)


def rng_of_process(state: dict, procs) -> dict:
    """This process's RNG state in a mid-epoch checkpoint (each process has its own attack noise); a
    checkpoint of another number of processes, or an older one, has rank 0's only."""
    per_rank = state.get("rng_per_rank") or []
    return per_rank[procs.rank] if len(per_rank) == procs.world_size else state["rng"]


# Keys that do not change what is trained: a resumed run may differ in these without a warning.
RESUME_IGNORED = ("resume", "device", "eval", "logger", "train.log_every", "train.progress", "ckpt")


def config_differences(saved: dict, current: dict, prefix: str = "", ignored=RESUME_IGNORED) -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}{key}"
        if name in ignored:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, name + ".", ignored)
        elif key not in saved:  # a key added to the configs after the saved run was made
            keys.append(f"{name}: (absent, an older version's config) -> {b!r}")
        elif a != b:
            keys.append(f"{name}: {a!r} -> {b!r}")
    return keys


def load_resume_state(cfg, ckpt_dir: Path) -> dict | None:
    """resume=auto: the run dir's last.pt (or its previous good copy); never; or a checkpoint / run dir."""
    if cfg.resume == "auto":
        return checkpoint.load_latest(ckpt_dir / "last.pt")
    if cfg.resume == "never":
        return None
    path = Path(cfg.resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    state = checkpoint.load(path)
    if "optimizer" not in state:
        raise checkpoint.CheckpointError(
            f"resume={cfg.resume!r} is a model-only checkpoint (best.pt?): resuming needs a last.pt"
        )
    return state


def run(cfg, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    check_run(cfg)  # bad values fail here, before anything is written
    keep_freed_memory()  # CPU steps without page faults on fresh tensors (see runner/allocator.py)
    distributed.share_cores_with_sibling_jobs()
    check_writable_dir(run_dir, "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun, multi-task SLURM): one run directory, written by rank 0 only.
    procs, device = distributed.setup(resolve_device(cfg.device))
    run_lock = lock_run_dir(run_dir) if procs.is_main else None  # released in `finally` (or at exit)
    ckpt_dir = run_dir / "checkpoints"
    seed_everything(cfg.seed, cfg.deterministic)

    with warnings.catch_warnings(record=True) as resume_warnings:
        warnings.simplefilter("always")
        try:
            resume_state = load_resume_state(cfg, ckpt_dir)
        except BaseException:
            if run_lock is not None:
                run_lock.close()
            raise
    tracker = (Tracker(run_dir, cfg, run_id=(resume_state or {}).get("logger_run_id")) if procs.is_main
               else distributed.SilentTracker())
    for warning in resume_warnings:
        tracker.warning(str(warning.message))
    # The resolved config, converted once: config.json, every checkpoint and results.json carry it.
    config = OmegaConf.to_container(cfg, resolve=True)
    # Rank 0 reads the run directory before its status.json says "running"; every process follows its verdict.
    done = completed_results(run_dir, config, resume_state) if procs.is_main and cfg.resume == "auto" else None
    complete = distributed.agree(done is not None, procs)
    tracker.status("running")
    finished_training = {}  # {"trained": True} once training is done: what robust-eval reads in status.json
    if procs.is_main:
        write_json(run_dir / "config.json", config)
    stop = StopRequests()
    exit_code = 1
    try:
        if complete:  # e.g. a sweep run again to finish its other jobs: hours of AutoAttack saved
            tracker.info(f"already complete: {run_dir / 'results.json'} holds this command's training and "
                         "evaluation (move it away, or add resume=never to retrain, to run them again; "
                         f"robust-eval ckpt={run_dir} evaluates the trained model again)")
            tracker.status("completed", trained=True)
            exit_code = 0
            return done or {}
        splits = load_splits(cfg.dataset, cfg.seed)
        model = build_model(cfg.model, splits.info).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = distributed.shard_method(build_method(cfg), procs, stop)
        optimizer = build_optimizer(cfg.optimizer, model)
        loader = InMemoryLoader(
            *splits.train, cfg.train.batch_size, device, augment=cfg.dataset.augment,
            padding=cfg.dataset.crop_padding, padding_mode=cfg.dataset.crop_padding_mode, seed=cfg.seed,
            rank=procs.rank, world_size=procs.world_size,
        )
        steps_per_epoch, epochs = len(loader), cfg.train.epochs
        total_steps = steps_per_epoch * epochs
        scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, total_steps)
        update = build_update(cfg, model, optimizer)
        x_val, y_val = to_float(splits.val[0]).to(device), splits.val[1].to(device)
        guard = CollapseGuard(cfg.train.collapse_drop)

        start_epoch, resume_batch, step, best_score, skipped, train_time = 0, 0, 0, [-1.0, -1.0], 0, 0.0
        if resume_state is not None:
            try:
                model.load_state_dict(resume_state["model"])
            except RuntimeError as err:
                raise ValueError(
                    f"the checkpoint to resume from holds a different model than "
                    f"model.name={cfg.model.name!r}: {str(err).splitlines()[0]}; use resume=never or a "
                    f"checkpoint of this config"
                ) from None
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            update.load_state_dict(resume_state["update"])
            restore_rng(resume_state["rng"])
            start_epoch, resume_batch = resume_state["epoch"], resume_state.get("batch", 0)
            step, skipped = resume_state["step"], resume_state.get("nonfinite_skipped", 0)
            best_score, train_time = selection_key(resume_state["best_score"]), resume_state["train_time_s"]
            guard.load_state_dict(resume_state.get("collapse_guard"))
            changed = config_differences(resume_state.get("config", {}), config)
            if changed:
                tracker.warning("resuming with a config that differs from the checkpoint's: "
                                + "; ".join(changed))
            # Epochs are numbered from 1, as in the log's epoch lines.
            tracker.info(f"resumed in epoch {start_epoch + 1} after batch {resume_batch} (step {step})" if resume_batch
                         else f"resumed after epoch {start_epoch} (step {step})")
        else:
            method.setup(model)
        schedule_warnings = method.schedule_warnings(steps_per_epoch, epochs) + update.schedule_warnings(epochs)
        for warning in schedule_warnings:
            tracker.warning(warning)
        tracker.info(
            f"{method_name(cfg)} on {cfg.dataset.name} ({len(splits.train[1])} train / {len(y_val)} val / "
            f"{len(splits.test[1])} test), {cfg.model.name}, {cfg.threat.norm} eps={cfg.threat.eps:.4g}, "
            f"{epochs} epochs x {steps_per_epoch} steps, device {device}, run dir {run_dir}"
        )
        tracker.start_progress(total_steps, step)
        model_for_step = distributed.wrap_model(model, procs, device)
        model_for_step = torch.compile(model_for_step) if cfg.train.compile else model_for_step

        def training_state(epoch: int, batch: int, elapsed: float) -> dict:
            """Everything a resume needs to continue bit for bit at (epoch, batch)."""
            return {
                **model_checkpoint(cfg, model, config=config),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "update": update.state_dict(), "rng": rng_state(),
                "epoch": epoch, "batch": batch, "step": step, "best_score": best_score,
                "train_time_s": elapsed, "nonfinite_skipped": skipped, "logger_run_id": tracker.run_id,
                "collapse_guard": guard.state_dict(),
            }

        norm, eps = cfg.threat.norm, float(cfg.threat.eps)  # read once: config lookups are slow per step
        # A run stopped by the collapse guard stays stopped: running its command again only evaluates.
        last_epoch = guard.collapse["epoch"] if guard.collapse else epochs
        for epoch in range(start_epoch, last_epoch):
            skip = resume_batch if epoch == start_epoch else 0
            if skip:
                restore_rng(rng_of_process(resume_state, procs))  # mid-epoch checkpoint: where it stopped
            else:
                torch.manual_seed(epoch_seed(cfg.seed, epoch) + procs.rank)  # each rank its own attack noise
            loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            model.train()
            with stop.deferred():  # SIGTERM/SIGUSR1 now mean: checkpoint at the next step, then stop
                for batch, (x, y) in enumerate(loader):
                    guard.remember(x, y)
                    if batch < skip:  # replayed, not trained: the loader's random draws stay in step
                        continue
                    ctx = StepContext(epoch, step, steps_per_epoch, total_steps, norm, eps)
                    logs = update(model_for_step, method, x, y, ctx)
                    if logs.get("nonfinite"):
                        skipped += 1
                        if cfg.train.nonfinite == "stop" or skipped > cfg.train.max_skips:
                            raise NonFiniteLoss(nonfinite_message(cfg, logs, epoch, step, skipped, ckpt_dir))
                        # The schedule follows the step count, skipped steps included; torch's warning about a
                        # scheduler step before any optimizer step would only confuse here.
                        with warnings.catch_warnings():
                            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                            scheduler.step()
                    else:
                        scheduler.step()
                    step += 1
                    tracker.step(step, {**logs, "nonfinite_skipped": skipped} if skipped else logs, epoch + 1,
                                 optimizer.param_groups[0]["lr"])  # epochs numbered from 1, as the epoch rows
                    if stop.agreed if procs.enabled else stop.requested:
                        elapsed = train_time + time.perf_counter() - epoch_start
                        # Mid-epoch, every process's RNG (its own attack noise) and the mean BatchNorm
                        # statistics go into last.pt, so the resumed processes continue exactly.
                        distributed.average_buffers(model, procs)
                        generators = distributed.gather_objects(rng_state(), procs)
                        if procs.is_main:
                            checkpoint.save({**training_state(epoch, batch + 1, elapsed), "rng_per_rank": generators},
                                            ckpt_dir / "last.pt", keep_previous=True)
                        where = f"in epoch {epoch + 1} after batch {batch + 1} (step {step}), checkpointed"
                        raise stop.interrupted(where)
                train_time += time.perf_counter() - epoch_start
                distributed.average_buffers(model, procs)

                epoch_metrics = {"epoch": epoch + 1, "epoch_time_s": time.perf_counter() - epoch_start}
                val_ctx = StepContext(epoch, step, steps_per_epoch, total_steps, norm, eps)
                collapsed = guard.collapsed(method, model, val_ctx, epoch, procs)
                validating = len(y_val) > 0 and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == epochs)
                if procs.is_main and validating:  # dataset.val_size=0: no validation split, no best.pt
                    model.eval()
                    epoch_metrics.update(method.validate(model, x_val, y_val, val_ctx))
                    score = selection_key(epoch_metrics)
                    if score > best_score and not collapsed:  # the collapsed model is never best.pt
                        best_score = score
                        best = model_checkpoint(cfg, model, {"epoch": epoch + 1, "val": epoch_metrics}, config)
                        checkpoint.save(best, ckpt_dir / "best.pt")
                if collapsed:  # the final model is the last good epoch's, as the reference keeps it
                    guard.restore(model)
                if procs.is_main:
                    checkpoint.save(training_state(epoch + 1, 0, train_time), ckpt_dir / "last.pt",
                                    keep_previous=True)
                tracker.epoch(step, epoch_metrics)
                if collapsed:
                    c = guard.collapse
                    tracker.warning(
                        f"catastrophic overfitting in epoch {c['epoch']}: the validation metric "
                        f"({method.select_on}) on the epoch's first training batch fell from {c['previous']:.3f} "
                        f"to {c['score']:.3f}, more than train.collapse_drop={guard.drop}; training stops here"
                        + (f" with epoch {c['restored_epoch']}'s model" if c.get("restored_epoch") is not None else "")
                    )
                    break
                if distributed.stop_agreed(stop, procs):  # one decision for all processes
                    raise stop.interrupted(f"after epoch {epoch + 1} (step {step}), checkpointed")
        tracker.stop_progress()
        if distributed.stop_agreed(stop, procs):
            raise stop.interrupted(f"after training (step {step}), checkpointed")
        distributed.after_training(procs)  # the others then wait for rank 0's evaluation, however long
        stop.immediate = "during the evaluation (training is complete and checkpointed)"
        finished_training = {"trained": True}
        tracker.status("running", **finished_training)
        if not procs.is_main:  # rank 0 evaluates and writes the results
            exit_code = 0
            return {}

        which = evaluated_checkpoint(cfg.eval.checkpoint, method)
        chosen = ckpt_dir / f"{which}.pt"
        if which == "best" and not chosen.exists():  # no epoch had a finite validation score
            tracker.warning("no best.pt was written (no validation score was finite): evaluating the final model")
            which, chosen = "last", ckpt_dir / "last.pt"
        trained_epochs = guard.collapse["epoch"] if guard.collapse else epochs
        evaluated_epoch, source = trained_epochs, f"{which}.pt, the final model (epoch {trained_epochs})"
        if guard.collapse and guard.collapse.get("restored_epoch") is not None:  # the guard put it back
            evaluated_epoch = guard.collapse["restored_epoch"]
            source = (f"{which}.pt, the final model: epoch {evaluated_epoch}'s, from before the collapse in "
                      f"epoch {trained_epochs}")
        if chosen.exists():
            saved = checkpoint.load(chosen)
            model.load_state_dict(saved["model"])
            if which == "best":
                evaluated_epoch = saved.get("epoch")
                score = saved.get("val", {}).get("val/score")
                value = f" {score:.4f}" if isinstance(score, float) else ""
                source = (f"best.pt, epoch {evaluated_epoch}: the best validation score ({method.select_on}{value}; "
                          f"ties go to the higher clean accuracy, then the earlier epoch)")
        keep_earlier_results(run_dir, tracker.info)  # a rerun with another eval suite loses nothing
        tracker.info(f"evaluating {source} with suite '{cfg.eval.name}'")
        # Everything but the metrics first: the report's header (written with the metrics) names them all.
        run_info = run_summary(cfg)
        if splits.flipped is not None:  # how many labels the noise really changed (patrini maps only some classes)
            run_info["label_noise"]["flipped"] = int(splits.flipped.sum())
        info = {
            "run": run_info,
            "train": {"epochs": epochs, "epochs_trained": trained_epochs, "wall_time_s": round(train_time, 3),
                      "steps": step, "checkpoint": which, "checkpoint_epoch": evaluated_epoch,
                      "steps_per_epoch": steps_per_epoch, "nonfinite_skipped": skipped,
                      "processes": procs.world_size, "collapse_guard": guard.summary(),
                      "warnings": schedule_warnings},
            "env": {**environment(device), **run_environment(cfg)},
        }
        metrics = evaluate(model, cfg, to_float(splits.test[0]), splits.test[1], device, run_dir, source, info)
        results = {"run": info["run"], "train": info["train"], **metrics, "env": info["env"], "config": config}
        write_json(run_dir / "results.json", results)
        tracker.status("completed", **finished_training)
        exit_code = 0
        return results
    except BaseException as err:
        if isinstance(err, RunInterrupted | KeyboardInterrupt):
            tracker.info(f"interrupted: {err or 'KeyboardInterrupt'}")
            tracker.status("interrupted", error=f"{type(err).__name__}: {err}",
                           signal=getattr(err, "signum", None), resume="run the same command again",
                           **finished_training)
        else:  # train.log read later is not left without the reason (the console has the error line)
            tracker.to_log_file(f"FAILED: {type(err).__name__}: {err}")
            tracker.status("failed", error=f"{type(err).__name__}: {err}", **finished_training)
        raise
    finally:
        stop.close()
        tracker.finish(exit_code)
        if run_lock is not None:
            run_lock.close()
        distributed.teardown(procs, finished=exit_code == 0)
        if exit_code:  # a SLURM job stopped before its time limit (SIGUSR1): submitit requeues it
            distributed.requeue_if_submitit(stop.signum)


# Keys that change no number: a rerun that differs only in them is the same run.
NOT_AFFECTING_RESULTS = ("resume", "logger", "train.progress", "train.log_every")


def completed_results(run_dir: Path, config: dict, resume_state: dict | None) -> dict | None:
    """The run directory's results when they are this very command's, trained to the end and evaluated
    (status completed, results.json of the same resolved config, last.pt the final one); else None."""
    if resume_state is None or resume_state.get("batch") or read_status(run_dir).get("status") != "completed":
        return None
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):  # (older results.json)
        return None
    trained = results.get("train") or {}
    end = (resume_state.get("epoch"), resume_state.get("step"))
    same_end = end == (trained.get("epochs_trained"), trained.get("steps"))
    current = json.loads(json.dumps(config, default=str))  # as results.json holds it
    differs = config_differences(results["config"], current, ignored=NOT_AFFECTING_RESULTS)
    return results if same_end and not differs else None


def evaluated_checkpoint(setting: str, method) -> str:
    """eval.checkpoint resolved: auto means the checkpoint the method's reference reports."""
    return method.reported_checkpoint if setting == "auto" else setting


def nonfinite_message(cfg, logs: dict, epoch: int, step: int, skipped: int, ckpt_dir: Path) -> str:
    last = ckpt_dir / "last.pt"
    where = (f"the last good checkpoint is {last}" if last.exists()
             else "no checkpoint was written yet (it diverged in the first epoch)")
    cause = ("a non-finite loss" if cfg.train.nonfinite == "stop"
             else f"{skipped} non-finite steps (more than train.max_skips={cfg.train.max_skips})")
    return (f"training stopped on {cause} (loss={float(logs['loss'])}) in epoch {epoch + 1} at step {step}; "
            f"{where}. Lower optimizer.lr (now {cfg.optimizer.lr}), set train.grad_clip, "
            f"or use train.nonfinite=skip")
