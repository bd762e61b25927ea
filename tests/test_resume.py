"""Crashes, kills and signals lose nothing: a run killed anywhere and restarted with the same command
ends with exactly the weights of an uninterrupted run (CPU, deterministic=true), and a restarted run
trains only what the checkpoint had not: it starts at the checkpoint's step, from its state.

The end-to-end test drives real `robust-train` processes: SIGKILL mid-epoch (before and after the first
checkpoint), SIGTERM mid-epoch (checkpoint, status "interrupted", exit 143), SIGKILL between a
checkpoint's temporary file and its rename (test hook ROBUST_TRAIN_TEST_KILL_IN_SAVE), and a truncated
last.pt. Cheaper in-process tests cover SIGUSR1, the resume settings and the two-processes-one-directory
guard.
"""

import copy
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from runner import checkpoint
from runner.config import compose
from runner.errors import RunDirBusy, RunInterrupted
from runner.tracking import StopRequests, lock_run_dir

# 3 epochs x 11 steps of PGD-2 adversarial training on digits: steps 1-11 are epoch 0, 12-22 epoch 1...
COMMAND = [
    "+method=at", "method.attack.steps=2", "train.epochs=3", "train.batch_size=128", "eval=none",
    "deterministic=true", "device=cpu", "train.log_every=1", "train.progress=plain",
]
STEPS_PER_EPOCH, TOTAL_STEPS = 11, 33
TIMEOUT_S = 300  # a safety net against a hung child, not a speed requirement

# Each `robust-train` below is a real process (it can be SIGKILLed), forked from a server that has
# imported the runner once and never computed anything, so a launch costs a fork instead of the
# seconds of importing torch and Hydra.
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["runner.cli", "runner.train"])

STEP_LINE = re.compile(r"\] step (\d+) epoch=")  # the plain log line of one training step (log_every=1)
# "resumed after epoch E (step S)" or "resumed in epoch E after batch B (step S)", epochs from 1.
RESUMED_LINE = re.compile(r"resumed (?:after epoch (\d+)|in epoch (\d+) after batch (\d+)) \(step (\d+)\)")


def _resumed_at(out: str) -> list[tuple[int, int, int]]:
    """(0-based epoch, batches done in it, step) of each resume line."""
    return [(int(done), 0, int(step)) if done else (int(epoch) - 1, int(batch), int(step))
            for done, epoch, batch, step in RESUMED_LINE.findall(out)]


def _hold_at_gate(gate_step: int, release: str) -> None:
    """In the child: after logging step `gate_step`, wait until the file `release` exists (the parent
    creates it right after sending its signal). The signal still lands anywhere between the step the
    parent waits for and the gate, but a child the parent's polling falls behind cannot run past the
    gate (into the next epoch, or to the end of training) before it arrives."""
    from runner import tracking

    log_step = tracking.Tracker.step

    def step_then_wait(self, step, *args, **kwargs):
        log_step(self, step, *args, **kwargs)
        if step == gate_step:
            deadline = time.monotonic() + TIMEOUT_S
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)

    tracking.Tracker.step = step_then_wait


def _robust_train(argv: list[str], cwd: str, env: dict, log: str, gate) -> None:
    """The child: `robust-train <argv>` in `cwd`, its stdout and stderr appended to `log`."""
    from runner.cli import train_main

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(cwd)
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env)
    if gate is not None:
        _hold_at_gate(*gate)
    sys.argv = ["robust-train", *argv]
    train_main()


class Launched:
    def __init__(self, cwd: Path, extra_env: dict | None = None, gate_step: int | None = None):
        n = len(list(cwd.glob("launch-*.log")))
        self.log = cwd / f"launch-{n}.log"
        self.log.touch()
        self.release = cwd / f"release-{n}"
        gate = None if gate_step is None else (gate_step, str(self.release))
        self.process = PROCESSES.Process(target=_robust_train,
                                         args=(COMMAND, str(cwd), extra_env or {}, str(self.log), gate))
        self.process.start()

    def steps(self) -> list[int]:
        """The training steps this launch has logged so far (its own stdout), in order."""
        return [int(step) for step in STEP_LINE.findall(self.log.read_text())]


def launch(cwd: Path, extra_env: dict | None = None, gate_step: int | None = None) -> Launched:
    return Launched(cwd, extra_env, gate_step)


def run_dir(cwd: Path) -> Path:
    dirs = list((cwd / "outputs" / "runs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def signal_at_step(launched: Launched, step: int, signum: int) -> int:
    """Send `signum` once this launch has logged `step` (then open its gate); returns the last step it had
    logged when the signal was sent: the child may be a few steps further when it arrives."""
    deadline = time.monotonic() + TIMEOUT_S
    while (done := max(launched.steps(), default=0)) < step:
        assert launched.process.is_alive(), f"the run ended before step {step}:\n{launched.log.read_text()}"
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.02)
    os.kill(launched.process.pid, signum)
    launched.release.touch()
    return done


def finish(launched: Launched) -> tuple[int, str]:
    launched.process.join(TIMEOUT_S)
    assert launched.process.exitcode is not None, "the run hung"
    return launched.process.exitcode, launched.log.read_text()


def assert_trained_on_from(launched: Launched, out: str, start: dict | None) -> list[int]:
    """This launch continued from exactly the checkpoint `start` (None: no checkpoint, from scratch): it
    says so, and the steps it trained are the ones after the checkpoint's, each once, none skipped. A
    launch that ignored the checkpoint and retrained from step 1 ends bitwise equal all the same
    (training is deterministic); this is what tells them apart. Returns the steps it logged."""
    steps = launched.steps()
    resumed = _resumed_at(out)
    if start is None:
        assert resumed == [], out
        first = 1
    else:
        assert resumed == [(start["epoch"], start["batch"], start["step"])], out
        assert start["epoch"] * STEPS_PER_EPOCH + start["batch"] == start["step"], start
        first = start["step"] + 1
    assert steps == list(range(first, first + len(steps))), (first, steps)
    return steps


def final_weights(directory: Path) -> dict:
    state = checkpoint.load(directory / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["batch"] == 0
    return state["model"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_same_state(a, b, where: str = "") -> None:
    """Nested state dicts (optimizer, scheduler) equal: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path):
    """Each signal goes to the child once it has logged a given step; where it lands after that depends
    on the machine's load, so the test asserts what must hold wherever it lands. A gate a few steps on
    (see _hold_at_gate) keeps each interruption within its epoch."""
    reference_cwd, cwd = tmp_path / "reference", tmp_path / "interrupted"
    reference_cwd.mkdir()
    cwd.mkdir()
    reference = launch(reference_cwd)  # runs alongside the interrupted chain

    # 1. SIGKILL in epoch 0 (steps 4-10), before any checkpoint exists.
    proc = launch(cwd, gate_step=10)
    killed_at = signal_at_step(proc, 4, signal.SIGKILL)
    code, out = finish(proc)
    assert code == -signal.SIGKILL, out
    steps = assert_trained_on_from(proc, out, None)
    assert killed_at <= steps[-1] <= 10
    directory = run_dir(cwd)
    last = directory / "checkpoints" / "last.pt"
    assert not last.exists()
    kill_points = [("SIGKILL", killed_at)]

    # 2. SIGTERM in epoch 1 (steps 14-21): a checkpoint at the next step boundary, status "interrupted",
    # exit 128+15. The run starts from scratch: the killed one left no checkpoint.
    proc = launch(cwd, gate_step=21)
    killed_at = signal_at_step(proc, 14, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "stopped by SIGTERM" in out
    status = json.loads((directory / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == signal.SIGTERM
    steps = assert_trained_on_from(proc, out, None)
    mid_epoch = checkpoint.load(last)
    # The checkpoint holds every step this launch trained: the one the signal was seen at, or a later one.
    assert mid_epoch["step"] == steps[-1] and killed_at <= mid_epoch["step"] <= 21, (killed_at, steps)
    assert mid_epoch["epoch"] == 1 and 0 < mid_epoch["batch"] < STEPS_PER_EPOCH, mid_epoch["batch"]
    assert mid_epoch["epoch"] * STEPS_PER_EPOCH + mid_epoch["batch"] == mid_epoch["step"]
    kill_points.append(("SIGTERM", killed_at))

    # 3. SIGKILL while writing the end-of-epoch-1 checkpoint, after the temporary file, before the rename.
    proc = launch(cwd, {"ROBUST_TRAIN_TEST_KILL_IN_SAVE": "1"})
    code, out = finish(proc)
    assert code == -signal.SIGKILL, out
    assert (directory / "checkpoints" / ".last.pt.tmp").exists()
    assert checkpoint.load(last)["step"] == mid_epoch["step"]
    steps = assert_trained_on_from(proc, out, mid_epoch)  # the rest of epoch 1, from the mid-epoch state
    assert steps[-1] == 2 * STEPS_PER_EPOCH
    kill_points.append(("SIGKILL in checkpoint.save", 2 * STEPS_PER_EPOCH))

    # 4. SIGKILL in epoch 2 (steps 25-32), after the epoch-1 checkpoint.
    proc = launch(cwd, gate_step=32)
    killed_at = signal_at_step(proc, 25, signal.SIGKILL)
    code, out = finish(proc)
    assert code == -signal.SIGKILL, out
    steps = assert_trained_on_from(proc, out, mid_epoch)
    assert killed_at <= steps[-1] <= 32
    end_of_epoch_1 = checkpoint.load(last)
    assert (end_of_epoch_1["epoch"], end_of_epoch_1["batch"]) == (2, 0)
    assert end_of_epoch_1["step"] == 2 * STEPS_PER_EPOCH
    kill_points.append(("SIGKILL", killed_at))

    # 5. A truncated last.pt: detected, moved aside, the run resumes from last.prev.pt (the mid-epoch
    # checkpoint) and trains exactly the steps after it.
    previous = checkpoint.load(checkpoint.previous_path(last))
    assert previous["step"] == mid_epoch["step"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = launch(cwd)
    code, out = finish(proc)
    assert code == 0, out
    assert "previous good checkpoint" in out and "Traceback" not in out
    assert (directory / "checkpoints" / "last.corrupt.pt").exists()
    assert json.loads((directory / "status.json").read_text())["status"] == "completed"
    steps = assert_trained_on_from(proc, out, previous)
    assert steps[-1] == TOTAL_STEPS and len(steps) == TOTAL_STEPS - previous["step"]

    code, out = finish(reference)
    assert code == 0, out
    assert assert_trained_on_from(reference, out, None) == list(range(1, TOTAL_STEPS + 1))
    print("kill points (signal, last logged step):", kill_points)
    assert_identical(final_weights(directory), final_weights(run_dir(reference_cwd)))
    best = checkpoint.load(directory / "checkpoints" / "best.pt")["model"]
    assert_identical(best, checkpoint.load(run_dir(reference_cwd) / "checkpoints" / "best.pt")["model"])


# ---- in-process: SIGUSR1 mid-epoch, exact ----------------------------------------------------------

def small_config(**extra):
    overrides = ["model=mlp", "model.hidden=[32]", "+method=at", "method.attack.steps=1", "train.epochs=2",
                 "train.batch_size=256", "eval=none", "deterministic=true", "device=cpu",
                 "train.progress=plain"]
    return compose(overrides + [f"{k}={v}" for k, v in extra.items()])


class TrainingSpy:
    """Watches an in-process run: the global step of every loss call, and the model, optimizer, scheduler
    and RNG state at the first one, i.e. right after a resume, before anything was trained."""

    def __init__(self, monkeypatch):
        import runner.train

        self.steps, self.first = [], None
        build_method, build_optimizer = runner.train.build_method, runner.train.build_optimizer
        build_scheduler = runner.train.build_scheduler

        def method(cfg):
            built = build_method(cfg)
            loss = built.loss

            def recording_loss(model, x, y, ctx):
                if self.first is None:
                    self.first = {
                        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                        "scheduler": copy.deepcopy(self.scheduler.state_dict()),
                        "rng": torch.get_rng_state().clone(),
                    }
                self.steps.append(ctx.step)
                return loss(model, x, y, ctx)

            built.loss = recording_loss
            return built

        def optimizer(cfg, model):
            self.optimizer = build_optimizer(cfg, model)
            return self.optimizer

        def scheduler(*args, **kwargs):
            self.scheduler = build_scheduler(*args, **kwargs)
            return self.scheduler

        monkeypatch.setattr(runner.train, "build_method", method)
        monkeypatch.setattr(runner.train, "build_optimizer", optimizer)
        monkeypatch.setattr(runner.train, "build_scheduler", scheduler)

    def assert_started_from(self, state: dict) -> None:
        """The run's first step started from exactly `state` (a training checkpoint)."""
        assert self.steps and self.steps[0] == state["step"], (self.steps[:3], state["step"])
        assert_identical(self.first["model"], state["model"])
        assert_same_state(self.first["optimizer"], state["optimizer"], "optimizer")
        scheduler = {k: v for k, v in self.first["scheduler"].items() if k != "lr_lambdas"}
        assert_same_state(scheduler, {k: v for k, v in state["scheduler"].items() if k != "lr_lambdas"},
                          "scheduler")


SMALL_STEPS_PER_EPOCH = 6  # small_config: 1,287 training points in batches of 256


def test_sigusr1_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, monkeypatch, wrap_method_loss,
                                                            signal_on_call):
    from runner.train import run

    cfg = small_config()
    run(cfg, tmp_path / "reference")
    with monkeypatch.context() as patch:
        wrap_method_loss(patch, signal_on_call(3, signal.SIGUSR1))
        with pytest.raises(RunInterrupted) as stopped:
            run(cfg, tmp_path / "run")
    assert stopped.value.signum == signal.SIGUSR1
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    with monkeypatch.context() as patch:
        spy = TrainingSpy(patch)
        run(cfg, tmp_path / "run")
    # The resumed run trained the 9 remaining steps only, from the checkpoint's model, optimizer,
    # schedule and mid-epoch RNG state.
    assert spy.steps == list(range(3, 2 * SMALL_STEPS_PER_EPOCH))
    spy.assert_started_from(state)
    assert torch.equal(spy.first["rng"], state["rng"]["torch"])
    resumed = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    reference = checkpoint.load(tmp_path / "reference" / "checkpoints" / "last.pt")
    assert resumed["step"] == reference["step"] == 2 * SMALL_STEPS_PER_EPOCH
    assert_identical(resumed["model"], reference["model"])
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for key, value in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])


# ---- in-process: resume=auto|never|<checkpoint>, and a changed config ------------------------------

def test_resume_never_starts_over_although_last_pt_exists(tmp_path, monkeypatch):
    from runner.train import run

    run(small_config(**{"train.epochs": 1}), tmp_path / "run")
    run(small_config(), tmp_path / "reference")
    with monkeypatch.context() as patch:
        spy = TrainingSpy(patch)
        run(small_config(resume="never"), tmp_path / "run")
    assert spy.steps == list(range(2 * SMALL_STEPS_PER_EPOCH))  # all 12 steps, not the 6 after last.pt
    assert "resumed at" not in (tmp_path / "run" / "train.log").read_text()
    assert_identical(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["model"],
                     checkpoint.load(tmp_path / "reference" / "checkpoints" / "last.pt")["model"])


@pytest.mark.parametrize("given", ["last.pt", "run dir"])
def test_resume_from_a_given_checkpoint_continues_it_in_a_new_run_dir(tmp_path, monkeypatch, given):
    from runner.train import run

    constant = {"scheduler": "constant"}  # the lr schedule then does not depend on train.epochs
    run(small_config(**constant, **{"train.epochs": 1}), tmp_path / "first")
    saved = checkpoint.load(tmp_path / "first" / "checkpoints" / "last.pt")
    run(small_config(**constant), tmp_path / "reference")
    source = tmp_path / "first" / "checkpoints" / "last.pt" if given == "last.pt" else tmp_path / "first"
    with monkeypatch.context() as patch:
        spy = TrainingSpy(patch)
        run(small_config(**constant, resume=source), tmp_path / "second")
    assert spy.steps == list(range(SMALL_STEPS_PER_EPOCH, 2 * SMALL_STEPS_PER_EPOCH))  # epoch 1 only
    spy.assert_started_from(saved)
    log = (tmp_path / "second" / "train.log").read_text()
    assert f"resumed after epoch 1 (step {SMALL_STEPS_PER_EPOCH})" in log
    assert_identical(checkpoint.load(tmp_path / "second" / "checkpoints" / "last.pt")["model"],
                     checkpoint.load(tmp_path / "reference" / "checkpoints" / "last.pt")["model"])


def test_resume_from_a_model_only_checkpoint_fails_with_the_reason(tmp_path):
    from runner.train import run

    run(small_config(**{"train.epochs": 1}), tmp_path / "first")
    best = tmp_path / "first" / "checkpoints" / "best.pt"
    with pytest.raises(checkpoint.CheckpointError, match=r"model-only checkpoint \(best\.pt\?\).*last\.pt"):
        run(small_config(resume=best), tmp_path / "second")
    assert not (tmp_path / "second" / "checkpoints").exists()  # nothing trained, nothing saved


def test_resuming_with_a_changed_config_warns_and_names_the_keys(tmp_path):
    from runner.train import run

    directory = tmp_path / "run"
    run(small_config(**{"train.epochs": 1}), directory)
    # Keys that do not change what is trained (logging, evaluation, device) resume without a warning.
    run(small_config(**{"train.epochs": 1, "train.log_every": 7, "eval.n_examples": 50}), directory)
    log = (directory / "train.log").read_text()
    assert log.count("resumed after epoch 1") == 1 and "differs" not in log
    run(small_config(**{"optimizer.lr": 0.05}), directory)  # and train.epochs 1 -> 2
    log = (directory / "train.log").read_text()
    warning = [line for line in log.splitlines() if "differs from the checkpoint's" in line]
    assert len(warning) == 1 and "WARNING" in warning[0], log
    assert "optimizer.lr: 0.1 -> 0.05" in warning[0] and "train.epochs: 1 -> 2" in warning[0]
    assert "train.log_every" not in warning[0]
    assert log.count("resumed after epoch 1 (") == 2


def test_a_signal_outside_the_training_loop_stops_at_once():
    stop = StopRequests()
    try:
        with pytest.raises(RunInterrupted, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler runs at the next bytecode boundary
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_in_the_training_loop_waits_for_the_step_unless_repeated():
    stop = StopRequests()
    try:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded only, for the next step boundary
            time.sleep(0.01)
            assert stop.requested
            with pytest.raises(RunInterrupted, match="SIGUSR1"):  # a second signal does not wait
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)
    finally:
        stop.close()


# ---- concurrency -----------------------------------------------------------------------------------

def _hold_lock(directory, ready, release):
    handle = lock_run_dir(Path(directory))
    ready.set()
    release.wait(30)
    handle.close()


def test_two_processes_never_share_a_run_directory(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            lock_run_dir(tmp_path)
    finally:
        release.set()
        holder.join(30)
    lock_run_dir(tmp_path).close()  # free again once the holder is gone


def test_a_second_run_into_a_busy_directory_fails_before_touching_it(tmp_path):
    from runner.errors import describe
    from runner.train import run

    handle = lock_run_dir(tmp_path)  # stands for a live process on this directory (flock is per open file)
    try:
        with pytest.raises(RunDirBusy) as busy:
            run(small_config(), tmp_path)
        assert "hydra.run.dir" in describe(busy.value)
        assert not (tmp_path / "status.json").exists()
    finally:
        handle.close()


class SlowDownloadDataset:
    """Stands in for a torchvision dataset: its download writes the file in pieces (as a real download
    and extraction does), and a half-written file reads as "corrupted", as torchvision reports it."""

    SIZE, PIECES = 4096, 8

    def __init__(self, root, train=True, download=False):
        path = Path(root) / "FakeSet" / ("train.bin" if train else "test.bin")
        if not path.exists() or path.stat().st_size != self.SIZE:
            if path.exists() and not download:
                raise RuntimeError("Dataset not found or corrupted.")
            if not download:
                raise RuntimeError("Dataset not found.")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(Path(root) / "downloads.log", "a") as log:
                log.write(f"{path.name}\n")
            with open(path, "wb") as f:
                for _ in range(self.PIECES):
                    f.write(bytes(range(256)) * (self.SIZE // 256 // self.PIECES))
                    f.flush()
                    time.sleep(0.05)
        raw = path.read_bytes()
        if len(raw) != self.SIZE or raw[:256] != bytes(range(256)):
            raise RuntimeError("Dataset not found or corrupted.")
        self.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(4, 32, 32)
        self.targets = [0, 1, 2, 3]


def _prepare_cache(data_dir: str, ready, go, result_queue) -> None:
    import torchvision.datasets

    from runner import data

    torchvision.datasets.MNIST = SlowDownloadDataset
    cfg = compose(["dataset=mnist", f"dataset.data_dir={data_dir}", "dataset.download=true"]).dataset
    ready.set()
    go.wait(30)
    (x, y), _ = data._torchvision(cfg)
    result_queue.put((x.sum().item(), y.tolist()))


def test_jobs_preparing_one_dataset_cache_download_it_once(tmp_path):
    jobs = 3
    ready = [PROCESSES.Event() for _ in range(jobs)]
    go, results = PROCESSES.Event(), PROCESSES.Queue()
    procs = [PROCESSES.Process(target=_prepare_cache, args=(str(tmp_path), r, go, results)) for r in ready]
    for p in procs:
        p.start()
    for r in ready:
        assert r.wait(TIMEOUT_S)
    go.set()  # all at once
    for p in procs:
        p.join(TIMEOUT_S)
        assert p.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in procs]
    assert all(o == outcomes[0] for o in outcomes)
    assert sorted((tmp_path / "downloads.log").read_text().split()) == ["test.bin", "train.bin"]


def test_config_differences_name_keys_an_older_config_lacks():
    """Resuming a run made before a key existed says so, rather than showing the key as None."""
    from runner.train import config_differences

    saved = {"dataset": {"name": "digits"}, "seed": 0}
    current = {"dataset": {"name": "digits", "crop_padding_mode": "zeros"}, "seed": 1}
    assert config_differences(saved, current) == [
        "dataset.crop_padding_mode: (absent, an older version's config) -> 'zeros'", "seed: 0 -> 1"]
