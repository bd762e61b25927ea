"""Crashes, kills and signals lose nothing: a run killed anywhere and restarted with the same command
ends with exactly the weights of an uninterrupted run (CPU, deterministic=true).

The end-to-end test drives real `robust-train` processes: SIGKILL mid-epoch (before and after the first
checkpoint), SIGTERM mid-epoch (checkpoint, status "interrupted", exit 143), SIGKILL between a
checkpoint's temporary file and its rename (test hook ROBUST_TRAIN_TEST_KILL_IN_SAVE), and a truncated
last.pt. Cheaper in-process tests cover SIGUSR1 and the two-processes-one-directory guard.
"""

import json
import multiprocessing
import os
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
TIMEOUT_S = 300  # a safety net against a hung child, not a speed requirement

# Each `robust-train` below is a real process (it can be SIGKILLed), forked from a server that has
# imported the runner once and never computed anything, so a launch costs a fork instead of the
# seconds of importing torch and Hydra.
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["runner.cli", "runner.train"])


def _robust_train(argv: list[str], cwd: str, env: dict, log: str) -> None:
    """The child: `robust-train <argv>` in `cwd`, its stdout and stderr appended to `log`."""
    from runner.cli import train_main

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(cwd)
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env)
    sys.argv = ["robust-train", *argv]
    train_main()


class Launched:
    def __init__(self, cwd: Path, extra_env: dict | None = None):
        self.log = cwd / f"launch-{len(list(cwd.glob('launch-*')))}.log"
        self.log.touch()
        self.process = PROCESSES.Process(target=_robust_train,
                                         args=(COMMAND, str(cwd), extra_env or {}, str(self.log)))
        self.process.start()


def launch(cwd: Path, extra_env: dict | None = None) -> Launched:
    return Launched(cwd, extra_env)


def run_dir(cwd: Path) -> Path:
    dirs = list((cwd / "outputs" / "runs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def steps_done(cwd: Path) -> int:
    """The last training step this run logged (metrics.jsonl, one row per step)."""
    runs = cwd / "outputs" / "runs"
    if not runs.exists() or not any(runs.iterdir()):
        return 0
    metrics = run_dir(cwd) / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if line.endswith("}") and '"kind": "train"' in line]
    return max(steps, default=0)


def signal_at_step(launched: Launched, cwd: Path, step: int, signum: int) -> int:
    """Send `signum` once the run has logged `step`; returns the step logged when it was sent."""
    deadline = time.monotonic() + TIMEOUT_S
    while (done := steps_done(cwd)) < step:
        assert launched.process.is_alive(), f"the run ended before step {step}:\n{launched.log.read_text()}"
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.02)
    os.kill(launched.process.pid, signum)
    return done


def finish(launched: Launched) -> tuple[int, str]:
    launched.process.join(TIMEOUT_S)
    assert launched.process.exitcode is not None, "the run hung"
    return launched.process.exitcode, launched.log.read_text()


def final_weights(directory: Path) -> dict:
    state = checkpoint.load(directory / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["batch"] == 0
    return state["model"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path):
    reference_cwd, cwd = tmp_path / "reference", tmp_path / "interrupted"
    reference_cwd.mkdir()
    cwd.mkdir()
    reference = launch(reference_cwd)  # runs alongside the interrupted chain

    # 1. SIGKILL in epoch 0, before any checkpoint exists.
    proc = launch(cwd)
    killed_at = signal_at_step(proc, cwd, 4, signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    kill_points = [("SIGKILL", killed_at)]

    # 2. SIGTERM in epoch 1: checkpoint at the next step boundary, status "interrupted", exit 128+15.
    proc = launch(cwd)
    killed_at = signal_at_step(proc, cwd, 14, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "stopped by SIGTERM" in out
    directory = run_dir(cwd)
    status = json.loads((directory / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == signal.SIGTERM
    mid_epoch = checkpoint.load(directory / "checkpoints" / "last.pt")
    assert mid_epoch["epoch"] == 1 and 0 < mid_epoch["batch"] < 11, (mid_epoch["epoch"], mid_epoch["batch"])
    kill_points.append(("SIGTERM", killed_at))

    # 3. SIGKILL while writing the end-of-epoch-1 checkpoint, after the temporary file, before the rename.
    proc = launch(cwd, {"ROBUST_TRAIN_TEST_KILL_IN_SAVE": "1"})
    assert finish(proc)[0] == -signal.SIGKILL
    assert (directory / "checkpoints" / ".last.pt.tmp").exists()
    assert checkpoint.load(directory / "checkpoints" / "last.pt")["step"] == mid_epoch["step"]
    kill_points.append(("SIGKILL in checkpoint.save", 22))

    # 4. SIGKILL in epoch 2, after the epoch-1 checkpoint.
    proc = launch(cwd)
    killed_at = signal_at_step(proc, cwd, 25, signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert checkpoint.load(directory / "checkpoints" / "last.pt")["epoch"] == 2
    kill_points.append(("SIGKILL", killed_at))

    # 5. A truncated last.pt: detected, moved aside, the run resumes from last.prev.pt and completes.
    last = directory / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = launch(cwd)
    code, out = finish(proc)
    assert code == 0, out
    assert "previous good checkpoint" in out and "Traceback" not in out
    assert (directory / "checkpoints" / "last.corrupt.pt").exists()
    assert json.loads((directory / "status.json").read_text())["status"] == "completed"

    code, out = finish(reference)
    assert code == 0, out
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


def signal_during_step(monkeypatch, at_call: int, signum: int) -> None:
    """Make the method's loss send `signum` to this process on its `at_call`-th call (mid-epoch)."""
    import runner.train

    build = runner.train.build_method
    calls = {"n": 0}

    def build_signalling(cfg):
        method = build(cfg)
        loss = method.loss

        def loss_and_signal(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                os.kill(os.getpid(), signum)
            return loss(*args, **kwargs)

        method.loss = loss_and_signal
        return method

    monkeypatch.setattr(runner.train, "build_method", build_signalling)


def test_sigusr1_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    from runner.train import run

    cfg = small_config()
    run(cfg, tmp_path / "reference")
    with monkeypatch.context() as patch:
        signal_during_step(patch, at_call=3, signum=signal.SIGUSR1)
        with pytest.raises(RunInterrupted) as stopped:
            run(cfg, tmp_path / "run")
    assert stopped.value.signum == signal.SIGUSR1
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    run(cfg, tmp_path / "run")
    resumed = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    reference = checkpoint.load(tmp_path / "reference" / "checkpoints" / "last.pt")
    assert_identical(resumed["model"], reference["model"])
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for key, value in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])


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
