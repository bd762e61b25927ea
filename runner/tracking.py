"""Everything the loop reports goes through one Tracker: plain log lines (train.log and stdout, readable
in SLURM .out files), metrics.jsonl, status.json, an optional rich progress bar on a terminal, and
wandb when asked. Logging never blocks a run: a wandb failure becomes a warning.
"""

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("robust_train")


def _scalar(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def write_json(path: Path, obj) -> None:
    """Atomic JSON write: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at emit time, so rich's progress bar can route lines above it."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(run_dir: Path, filename: str) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(run_dir / filename), _CurrentStdout()):
        handler.setFormatter(fmt)
        log.addHandler(handler)


class Tracker:
    def __init__(self, run_dir: Path, cfg, log_file: str = "train.log", run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.log_every = cfg.train.log_every
        setup_logging(self.run_dir, log_file)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finish()
        self.progress = None
        self.wandb = None
        self.run_id = run_id
        self._start_wandb()

    # ---- status -------------------------------------------------------------------------------------
    def status(self, status: str, **extra) -> None:
        write_json(self.run_dir / "status.json", {"status": status, "time": time.time(), **extra})
        if status == "interrupted" and self.wandb is not None:
            try:  # wandb shows the run as pre-empted (resumable), not crashed
                self.wandb.mark_preempting()
            except Exception:  # noqa: BLE001
                pass

    # ---- wandb ----------------------------------------------------------------------------------------
    def _start_wandb(self) -> None:
        if self.cfg.logger.name != "wandb":
            return
        mode = self.cfg.logger.mode
        if mode == "auto":  # decided before the run: no credentials means offline, never a blocking login
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
            mode = "online" if has_key else "offline"
        try:
            self.wandb = self._init_wandb(mode)
        except Exception as err:  # noqa: BLE001 - any wandb failure must leave the run going
            if mode != "online":
                warnings.warn(f"wandb could not start ({type(err).__name__}: {err}); logging locally only",
                              stacklevel=2)
                return
            warnings.warn(f"wandb could not start online ({type(err).__name__}: {err}); trying offline",
                          stacklevel=2)
            try:
                self.wandb = self._init_wandb("offline")
            except Exception as err2:  # noqa: BLE001
                warnings.warn(f"wandb could not start ({type(err2).__name__}: {err2}); logging locally only",
                              stacklevel=2)
                return
        self.run_id = self.wandb.id

    def _init_wandb(self, mode: str):
        import wandb
        from omegaconf import OmegaConf

        return wandb.init(
            project=self.cfg.logger.project, entity=self.cfg.logger.entity, mode=mode,
            dir=str(self.run_dir), id=self.run_id, resume="allow", tags=list(self.cfg.logger.tags),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )

    # ---- metrics ---------------------------------------------------------------------------------------
    def record(self, step: int, metrics: dict, kind: str) -> None:
        row = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in row.items() if k != "kind"}, step=step)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb.log failed ({err}); continuing with local logs", stacklevel=2)
                self.wandb = None

    def step(self, step: int, logs: dict, epoch: int, lr: float) -> None:
        """Called every optimisation step; reads tensors (a device sync) only every log_every steps."""
        if self.progress is not None:
            self.progress.advance(self._task)
        if step % self.log_every:
            return
        metrics = {"epoch": epoch, "lr": lr, **logs}
        self.record(step, metrics, "train")
        text = " ".join(f"{k}={_fmt(_scalar(v))}" for k, v in metrics.items())
        self.info(f"step {step} {text}")

    def epoch(self, step: int, metrics: dict) -> None:
        self.record(step, metrics, "epoch")
        self.info("epoch " + " ".join(f"{k}={_fmt(_scalar(v))}" for k, v in metrics.items()))

    def info(self, msg: str) -> None:
        log.info(msg)

    def to_log_file(self, msg: str) -> None:
        """A line for the log file only: what the console already shows in the command's own error line."""
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, None)
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)

    def warning(self, msg: str) -> None:
        log.warning(f"WARNING: {msg}")

    # ---- progress bar ----------------------------------------------------------------------------------
    def start_progress(self, total_steps: int, done: int) -> None:
        mode = self.cfg.train.progress
        if mode == "plain" or (mode == "auto" and not sys.stdout.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=total_steps, completed=done)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, exit_code: int = 0) -> None:
        self.stop_progress()
        self.metrics_file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed: {err}", stacklevel=2)
        for handler in list(log.handlers):
            handler.flush()


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- run lifecycle: one process per run directory, SIGTERM/SIGUSR1 as "checkpoint and stop" -------

LOCK_ATTEMPTS = 5


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `<run dir>/.lock` for this process's lifetime (released by the kernel when
    it dies, SIGKILL included), so two processes never train into the same directory. Returns the open
    lock file (keep it; closing it releases the lock), or None where file locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    handle = open(Path(run_dir) / ".lock", "a+")  # noqa: SIM115 - held for the run's lifetime
    try:
        for attempt in range(LOCK_ATTEMPTS):  # `lock_held` (summarize asking "alive?") holds it for an instant
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)
    except BlockingIOError:
        from runner.errors import RunDirBusy

        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RunDirBusy(
            f"run directory {str(run_dir)!r} is in use by another robust-train process (pid {holder}): the "
            f"same command is already running, or two sweep jobs map to one directory. Wait for it, or "
            f"give this run its own directory with hydra.run.dir=<dir>"
        ) from None
    except OSError:  # a file system without locks: run unprotected rather than not at all
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def lock_held(run_dir: Path) -> bool | None:
    """Whether a live process holds `<run dir>/.lock` (None: no lock file, or locks unavailable here)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return None
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
        return True
    except OSError:
        return None
    return False


def read_status(run_dir: Path) -> dict:
    """The run directory's status.json ({} when missing or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def run_state(run_dir: Path, status: dict | None = None) -> str | None:
    """status.json's status ("running", "completed", "failed", "interrupted"), with "running" read as
    "killed" when no process holds the run's lock any more (SIGKILL, an out-of-memory kill, a lost node:
    nothing could write the status). None without a readable status.json. `status`: one already read."""
    status = (read_status(run_dir) if status is None else status).get("status")
    if status == "running" and lock_held(run_dir) is False:
        return "killed"
    return status


# SIGUSR2 is submitit's time-limit signal: the run checkpoints first, then distributed.requeue_if_submitit
# hands over to submitit's requeue. SIGINT (Ctrl-C) is handled the same way: the training loop checkpoints
# the exact mid-epoch state and stops (exit 130); a second Ctrl-C stops at once.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
SIGNAL_NAMES = {"SIGINT": "Ctrl-C (SIGINT)"}
RESUME_HINT = "run the same command again to resume"
NOT_RESUMABLE = "an evaluation does not resume: run the same command again to evaluate from the start"


class StopRequests:
    """SIGTERM, SIGUSR1, SIGUSR2 (SLURM pre-emption, `--signal=USR1@<s>` before the time limit, `kill`) and
    SIGINT (Ctrl-C) ask the run to stop. Inside `deferred()` (the training loop) the request is recorded
    and the loop checkpoints at the next step boundary, then stops; elsewhere, or on a second signal, it
    raises RunInterrupted at once (last.pt from the latest boundary is intact either way).

    `hint` ends every message (what the user can do next); `immediate` says where a stop outside the
    deferred scope happened. Handlers are installed only from the main thread and restored by `close()`.
    """

    def __init__(self, hint: str = RESUME_HINT, immediate: str = "before the next checkpoint"):
        import signal
        import threading

        self.signum = None
        self.agreed = False  # several processes: the stop all of them decided at the last step (ShardedMethod)
        self.hint = hint
        self.immediate = immediate
        self._deferring = False
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self._deferring and first):
            raise self.interrupted(self.immediate)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, where: str):
        import signal

        from runner.errors import RunInterrupted

        name = signal.Signals(self.signum).name
        return RunInterrupted(self.signum, f"stopped by {SIGNAL_NAMES.get(name, name)} {where}; {self.hint}")

    def deferred(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            self._deferring = True
            try:
                yield
            finally:
                self._deferring = False

        return scope()

    def close(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def reserve_run_dir(path) -> Path:
    """A new, empty directory: `path`, or `path-2`, `path-3`... when another process (an evaluation started
    in the same second, an earlier kept evaluation) already has it. Each is created atomically: two
    processes never get the same one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir(exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free directory next to {str(path)!r}")


# What an evaluation writes into the run directory (results.json, report.md, the per-point results and the
# report's plots).
RESULT_FILES = ("results.json", "report.md", "per_example.json", "*.png")


def keep_earlier_results(run_dir: Path, say=None) -> Path | None:
    """Before a run directory's evaluation is written again (a finished run rerun with another eval suite:
    eval keys are not part of the run name), move the earlier results.json, report.md and plots to
    `earlier/<time they were written>/` (the report's image links still work there). Returns that folder
    and tells `say` (e.g. tracker.info) in one line; None when there was nothing to keep."""
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    if not results.exists():
        return None
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(results.stat().st_mtime))
    earlier = reserve_run_dir(run_dir / "earlier" / stamp)
    moved = []
    for pattern in RESULT_FILES:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file():
                os.replace(path, earlier / path.name)
                moved.append(path.name)
    if say is not None:
        say(f"kept the earlier evaluation ({', '.join(moved)}) in {earlier}")
    return earlier


def run_environment(cfg) -> dict:
    """What reproducing a run needs beyond the config: library versions, threads, the command line."""
    import importlib.metadata as metadata
    import platform
    import subprocess

    import torch

    from runner.allocator import keep_freed_memory

    versions = {}
    for package in ("robust-train", "numpy", "hydra-core", "omegaconf", "torchvision", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            timeout=5, cwd=Path(__file__).resolve().parent,
        )
        git_dirty = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        git_dirty = None
    return {
        "versions": versions, "platform": platform.platform(), "seed": cfg.seed,
        "deterministic": bool(cfg.deterministic), "torch_threads": torch.get_num_threads(),
        "git_dirty": git_dirty, "command": sys.argv, "malloc_keeps_freed_memory": keep_freed_memory(),
    }
