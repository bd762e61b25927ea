"""`run(cfg, run_dir)`: train, select, evaluate, write the run directory. One flat loop, top to bottom.

The loop never names a method: it asks the method for a loss (through the update rule, which may be
SAM) and for validation metrics. Resuming is exact because everything random in an epoch is seeded
from (seed, epoch) and every epoch ends with an atomic checkpoint of all state.
"""

import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from runner import checkpoint
from runner.data import InMemoryLoader, load_splits, to_float
from runner.evaluate import environment, evaluate
from runner.methods import build_method, method_name
from runner.methods.base import StepContext
from runner.models import build_model
from runner.optim import build_optimizer, build_scheduler
from runner.tracking import Tracker, write_json
from runner.update import build_update


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device={name!r} is not known; choose auto, cpu, cuda or cuda:N")
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
        "threat": {"norm": cfg.threat.norm, "eps": float(cfg.threat.eps), "eps_255": round(cfg.threat.eps * 255, 3)},
        "label_noise": {"fraction": cfg.dataset.label_noise, "kind": cfg.dataset.label_noise_kind},
    }


def model_checkpoint(cfg, model, extra: dict | None = None) -> dict:
    """What load_model needs: the weights and the config that builds the architecture."""
    return {"config": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict(), **(extra or {})}


def run(cfg, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)

    resume_state = None
    if cfg.resume == "auto":
        resume_state = checkpoint.load_latest(ckpt_dir / "last.pt")
    elif cfg.resume != "never":
        resume_state = checkpoint.load(Path(cfg.resume))
    tracker = Tracker(run_dir, cfg, run_id=(resume_state or {}).get("logger_run_id"))
    tracker.status("running")
    write_json(run_dir / "config.json", OmegaConf.to_container(cfg, resolve=True))
    exit_code = 1
    try:
        splits = load_splits(cfg.dataset, cfg.seed)
        model = build_model(cfg.model, splits.info).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = build_method(cfg)
        optimizer = build_optimizer(cfg.optimizer, model)
        loader = InMemoryLoader(
            *splits.train, cfg.train.batch_size, device, augment=cfg.dataset.augment,
            padding=cfg.dataset.crop_padding, seed=cfg.seed,
        )
        steps_per_epoch, epochs = len(loader), cfg.train.epochs
        total_steps = steps_per_epoch * epochs
        scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, total_steps)
        update = build_update(cfg, model, optimizer)
        x_val, y_val = to_float(splits.val[0]).to(device), splits.val[1].to(device)

        start_epoch, step, best_score, skipped, train_time = 0, 0, -1.0, 0, 0.0
        if resume_state is not None:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            update.load_state_dict(resume_state["update"])
            torch.set_rng_state(resume_state["rng"]["torch"])
            start_epoch, step = resume_state["epoch"], resume_state["step"]
            best_score, train_time = resume_state["best_score"], resume_state["train_time_s"]
            tracker.info(f"resumed from checkpoints/last.pt at epoch {start_epoch} (step {step})")
        else:
            method.setup(model)
        tracker.info(
            f"{method_name(cfg)} on {cfg.dataset.name} ({len(splits.train[1])} train / {len(y_val)} val / "
            f"{len(splits.test[1])} test), {cfg.model.name}, {cfg.threat.norm} eps={cfg.threat.eps:.4g}, "
            f"{epochs} epochs x {steps_per_epoch} steps, device {device}, run dir {run_dir}"
        )
        tracker.start_progress(total_steps, step)
        model_for_step = torch.compile(model) if cfg.train.compile else model

        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(cfg.seed, epoch))
            loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            model.train()
            for x, y in loader:
                ctx = StepContext(epoch, step, steps_per_epoch, total_steps, cfg.threat.norm, float(cfg.threat.eps))
                logs = update(model_for_step, method, x, y, ctx)
                if logs.get("nonfinite"):
                    skipped += 1
                    if cfg.train.nonfinite == "stop" or skipped > cfg.train.max_skips:
                        raise NonFiniteLoss(
                            f"non-finite loss ({float(logs['loss'])}) at epoch {epoch} step {step}; the last good "
                            f"checkpoint is checkpoints/last.pt (lower optimizer.lr, or train.nonfinite=skip)"
                        )
                scheduler.step()
                step += 1
                tracker.step(step, logs, epoch, optimizer.param_groups[0]["lr"])
            train_time += time.perf_counter() - epoch_start

            epoch_metrics = {"epoch": epoch + 1, "epoch_time_s": time.perf_counter() - epoch_start}
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == epochs:
                model.eval()
                val_ctx = StepContext(epoch, step, steps_per_epoch, total_steps, cfg.threat.norm, float(cfg.threat.eps))
                epoch_metrics.update(method.validate(model, x_val, y_val, val_ctx))
                if epoch_metrics["val/score"] > best_score:
                    best_score = epoch_metrics["val/score"]
                    checkpoint.save(model_checkpoint(cfg, model, {"epoch": epoch + 1, "val": epoch_metrics}),
                                    ckpt_dir / "best.pt")
            checkpoint.save({
                **model_checkpoint(cfg, model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "update": update.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "epoch": epoch + 1, "step": step, "best_score": best_score, "train_time_s": train_time,
                "logger_run_id": tracker.run_id,
            }, ckpt_dir / "last.pt", keep_previous=True)
            tracker.epoch(step, epoch_metrics)
        tracker.stop_progress()

        which = cfg.eval.checkpoint
        chosen = ckpt_dir / f"{which}.pt"
        if chosen.exists():
            model.load_state_dict(checkpoint.load(chosen)["model"])
        tracker.info(f"evaluating the {which} checkpoint with suite '{cfg.eval.name}'")
        results = {
            "run": run_summary(cfg),
            "train": {"epochs": epochs, "wall_time_s": round(train_time, 3), "steps": step,
                      "checkpoint": which, "steps_per_epoch": steps_per_epoch},
            **evaluate(model, cfg, to_float(splits.test[0]), splits.test[1], device, run_dir),
            "env": environment(device),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        write_json(run_dir / "results.json", results)
        tracker.status("completed")
        exit_code = 0
        return results
    except BaseException as err:
        tracker.status("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        tracker.finish(exit_code)
