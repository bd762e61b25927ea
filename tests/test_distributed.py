"""Multi-process training: sharded batches, DDP equivalence with one process, agreement between ranks,
and the submitit requeue hand-over. The end-to-end check runs `torchrun --nproc_per_node=2` on CPU."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from runner import distributed
from runner.data import InMemoryLoader

BIN = Path(sys.executable).parent


# ---- the loader's shares ---------------------------------------------------------------------------------

@pytest.mark.parametrize("augment", ["none", "crop", "crop_flip"])
def test_shares_of_every_process_make_the_single_process_batches(augment):
    x = torch.randint(0, 256, (103, 3, 6, 6), dtype=torch.uint8)
    y = torch.arange(103)

    def batches(rank=0, world=1):
        loader = InMemoryLoader(x, y, 16, torch.device("cpu"), augment=augment, padding=2, seed=5,
                                rank=rank, world_size=world)
        loader.set_epoch(3)
        return list(loader)

    single = batches()
    shares = [batches(rank, 3) for rank in range(3)]
    assert len(single) == len(shares[0]) == 7  # 6 full batches + the last 7 examples
    for i, (xb, yb) in enumerate(single):
        assert torch.equal(torch.cat([s[i][0] for s in shares]), xb)
        assert torch.equal(torch.cat([s[i][1] for s in shares]), yb)
        sizes = [len(s[i][1]) for s in shares]
        assert max(sizes) - min(sizes) <= 1


def test_last_batch_smaller_than_the_process_count_is_dropped():
    x, y = torch.rand(33, 1, 4, 4), torch.arange(33)  # 2 full batches of 16 + 1 example
    loaders = [InMemoryLoader(x, y, 16, torch.device("cpu"), rank=r, world_size=2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [2, 2]
    assert sum(len(yb) for loader in loaders for _, yb in loader) == 32
    assert len(InMemoryLoader(x, y, 16, torch.device("cpu"))) == 3


def test_global_batch_smaller_than_the_process_count_is_refused():
    with pytest.raises(ValueError, match="train.batch_size=2"):
        InMemoryLoader(torch.rand(8, 1, 2, 2), torch.arange(8), 2, torch.device("cpu"), world_size=4)


def test_augmented_crops_match_a_per_pixel_reference():
    from runner.data import CropWindows

    x = torch.rand(5, 2, 4, 4)
    top, left = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([2, 0, 1, 2, 0])
    flip = torch.tensor([True, False, True, False, False])
    crops = CropWindows(x, 1)(torch.arange(5), top, left, flip)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(5):
        expected = padded[i, :, top[i] : top[i] + 4, left[i] : left[i] + 4]
        assert torch.equal(crops[i], expected.flip(-1) if flip[i] else expected)


# ---- environment ---------------------------------------------------------------------------------------

def test_detect_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.detect() == distributed.Processes(rank=3, world_size=4, local_rank=1)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    procs = distributed.detect()
    assert procs == distributed.Processes() and procs.is_main and not procs.enabled


def test_detect_exports_the_torch_variables_of_a_multi_task_slurm_job():
    saved = dict(os.environ)
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="4",
                          SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_PROCID="3", SLURM_LOCALID="1",
                          SLURM_JOB_NODELIST="gpu[07-08]")
        assert distributed.detect() == distributed.Processes(rank=3, world_size=4, local_rank=1)
        assert os.environ["MASTER_ADDR"] == "gpu07"
        assert os.environ["MASTER_PORT"].isdigit()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_silent_tracker_accepts_every_call():
    tracker = distributed.SilentTracker()
    tracker.status("running")
    tracker.step(1, {"loss": 1.0}, 0, 0.1)
    tracker.anything_added_later(1, x=2)
    assert tracker.run_id is None


# ---- two ranks in this machine: gradients, agreement, buffers ------------------------------------------

class _MeanCE:
    """A method whose loss is the batch-mean CE; `nan_on_rank` makes one rank's loss non-finite."""

    select_on = "clean"

    def __init__(self, nan_on_rank=None):
        self.nan_on_rank = nan_on_rank

    def loss(self, model, x, y, ctx):
        loss = nn.functional.cross_entropy(model(x), y)
        if self.nan_on_rank is not None and torch.distributed.get_rank() == self.nan_on_rank:
            loss = loss * float("nan")
        return loss, {}


class _Stop:
    def __init__(self, signum):
        self.signum = signum


def _two_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)  # first: a forked child must not reuse the parent's intra-op thread pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    procs, device = distributed.setup(torch.device("cpu"))
    try:
        torch.manual_seed(0)  # the same model and global batch on both ranks
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
        x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
        share = slice(0, 3) if rank == 0 else slice(3, 7)  # uneven shares, as in a last batch
        model.eval()  # train-mode BatchNorm normalises each share by itself: DDP is exact only without it

        # The single-process gradient of the global batch mean, computed before DDP touches the model.
        reference = [torch.autograd.grad(nn.functional.cross_entropy(model(x), y), p)[0]
                     for p in [model[0].weight, model[3].weight]]

        ddp = distributed.wrap_model(model, procs, device)
        stop = _Stop(signal.SIGUSR1 if rank == 1 else None)
        method = distributed.shard_method(_MeanCE(), procs, stop)
        assert method.select_on == "clean"  # everything but the loss is the wrapped method's
        loss, _ = method.loss(ddp, x[share], y[share], None)
        loss.backward()
        got = [model[0].weight.grad, model[3].weight.grad]
        for g, r in zip(got, reference):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        assert stop.signum == signal.SIGUSR1 and stop.agreed  # rank 0 now stops with rank 1, at the same step
        # Outside a step (the end of an epoch) the decision is shared too, and so is what a checkpoint needs.
        assert distributed.shared_signal(signal.SIGTERM if rank == 1 else None, procs) == signal.SIGTERM
        assert distributed.shared_signal(None, procs) is None
        assert distributed.gather_objects({"rank": rank}, procs) == [{"rank": 0}, {"rank": 1}]

        nan_method = distributed.shard_method(_MeanCE(nan_on_rank=1), procs)
        nan_loss, _ = nan_method.loss(ddp, x[share], y[share], None)
        assert not torch.isfinite(nan_loss)  # on both ranks: both skip the step

        bn = model[1]
        bn.running_mean.fill_(float(rank))  # 0 and 1
        distributed.average_buffers(model, procs)
        torch.testing.assert_close(bn.running_mean, torch.full((5,), 0.5))
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        distributed.teardown(procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_global_gradient_and_agree_on_skips_and_stops(tmp_path):
    mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


def _hr_two_rank_worker(rank, port, out_dir, cfg):
    """HR's worst-case weights couple the batch: two ranks must give the single-process gradient."""
    from runner.methods import build_method
    from runner.methods.base import StepContext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    share = slice(0, 4) if rank == 0 else slice(4, 9)
    ctx = StepContext(0, 0, 1, 1, "linf", 0.0)  # eps 0: the losses are clean, no attack noise per rank
    hr = build_method(cfg)
    loss, logs = hr.loss(model, x, y, ctx)  # the single-process step, before joining the group
    reference = torch.autograd.grad(loss, model[0].weight)[0]
    single_stats = (float(logs["hr/max_weight"]), float(logs["hr/weight_entropy"]))

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    procs, device = distributed.setup(torch.device("cpu"))
    try:
        ddp = distributed.wrap_model(model, procs, device)
        method = distributed.shard_method(hr, procs)
        loss, logs = method.loss(ddp, x[share], y[share], ctx)
        loss.backward()
        torch.testing.assert_close(model[0].weight.grad, reference, rtol=1e-5, atol=1e-7)
        assert (float(logs["hr/max_weight"]), float(logs["hr/weight_entropy"])) == pytest.approx(single_stats)
        assert distributed.agree(rank == 0, procs)  # rank 0's verdict on both ranks
        gathered, start = distributed.gather_batch(torch.arange(float(len(y[share]))) + 10 * rank)
        assert gathered.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 14] and start == (0 if rank == 0 else 4)
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        distributed.teardown(procs)


def _ibp_two_rank_worker(rank, port, out_dir, cfg):
    """Shi's robust-only IBP loss on a network without BatchNorm needs no clean pass, yet under DDP it is the
    wrapper's forward that arms the gradient all-reduce: the two ranks must give the global gradient."""
    from runner.layers import Normalize
    from runner.methods import build_method
    from runner.methods.base import StepContext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.3]), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    share = slice(0, 5) if rank == 0 else slice(5, 10)
    ctx = StepContext(50, 5000, 100, 10_000, "linf", 0.1)  # after the ramp: kappa 0, robust loss only
    ibp = build_method(cfg)
    loss, logs = ibp.loss(model, x, y, ctx)
    assert logs["kappa"] == 0
    reference = torch.autograd.grad(loss, model[2].weight)[0]

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    procs, device = distributed.setup(torch.device("cpu"))
    try:
        ddp = distributed.wrap_model(model, procs, device)
        loss, _ = distributed.shard_method(ibp, procs).loss(ddp, x[share], y[share], ctx)
        loss.backward()
        torch.testing.assert_close(model[2].weight.grad, reference, rtol=1e-5, atol=1e-7)
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        distributed.teardown(procs)


def test_robust_only_ibp_averages_gradients_across_ranks(tmp_path):
    from runner.config import compose

    cfg = compose(["+method=ibp", "method.kappa=shi", "method.warmup_epochs=0", "method.ramp_epochs=1",
                   "method.reg_lambda=0", "method.ibp_init=false", "model.batch_norm=false"])
    mp.start_processes(_ibp_two_rank_worker, args=(_free_port(), str(tmp_path), cfg), nprocs=2, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


def test_hr_weights_are_computed_on_the_global_batch_across_ranks(tmp_path):
    from runner.config import compose

    cfg = compose(["+method=hr", "method.alpha=0.2", "method.r=0.5"])
    mp.start_processes(_hr_two_rank_worker, args=(_free_port(), str(tmp_path), cfg), nprocs=2, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


# ---- submitit requeue ----------------------------------------------------------------------------------

def test_requeue_hands_over_to_submitits_handler_only_for_time_limit_signals(monkeypatch):
    from submitit.core.job_environment import JobEnvironment

    calls = []

    def checkpoint_and_try_requeue(signum, frame):  # the name submitit's handler has
        calls.append(signum)

    submitit_signal = JobEnvironment._usr_sig()
    previous = signal.signal(submitit_signal, checkpoint_and_try_requeue)
    try:
        monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
        distributed.requeue_if_submitit(signal.SIGUSR1)  # not a submitit job
        monkeypatch.setenv("SUBMITIT_FOLDER", "/nonexistent")
        distributed.requeue_if_submitit(signal.SIGTERM)  # scancel: never requeue
        distributed.requeue_if_submitit(None)
        assert calls == []
        distributed.requeue_if_submitit(signal.SIGUSR1)
        assert calls == [submitit_signal]
    finally:
        signal.signal(submitit_signal, previous)


# ---- end to end: torchrun on CPU -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_torchrun_two_processes_match_one_process(tmp_path):
    from runner.config import compose
    from runner.train import run

    # Deterministic attacks (no random start) and uneven last shares (1287 = 20 x 64 + 7), with
    # crop + flip augmentation drawn for the global batch: two processes must equal one.
    overrides = ["+method=at", "method.attack.steps=2", "method.attack.random_start=false", "train.epochs=1",
                 "eval=none", "dataset.augment=crop_flip", "dataset.crop_padding=1", "device=cpu"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    torchrun = subprocess.Popen(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", str(BIN / "robust-train"), *overrides,
         f"hydra.run.dir={ddp}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        run(compose(overrides), single)  # the one-process reference, while torchrun starts up
        output, _ = torchrun.communicate(timeout=300)
    finally:
        torchrun.kill()
    assert torchrun.returncode == 0, output[-5000:]

    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    results = json.loads((ddp / "results.json").read_text())
    assert results["train"]["processes"] == 2
    assert results["train"]["steps"] == json.loads((single / "results.json").read_text())["train"]["steps"]
    log = (ddp / "train.log").read_text()
    assert log.count("at on digits") == 1  # only rank 0 writes


# A robust-train whose rank 1 alone sends itself SIGTERM right after its 30th step, after that step's
# all-reduce: the other rank must stop at the same step boundary (the next one), the checkpoint must hold
# every rank's RNG, and the resumed run must end exactly where an uninterrupted one does.
ONE_RANK_STOPS = """
import os, signal, sys
import runner.train
build = runner.train.build_update
def build_signalling(*args, **kwargs):
    update, calls = build(*args, **kwargs), [0]
    def signalling(*step_args, **step_kwargs):
        logs = update(*step_args, **step_kwargs)
        calls[0] += 1
        if calls[0] == 30 and os.environ.get("RANK") == "1" and os.environ.get("STOP_RANK_1"):
            os.kill(os.getpid(), signal.SIGTERM)
        return logs
    signalling.state_dict, signalling.load_state_dict = update.state_dict, update.load_state_dict
    signalling.schedule_warnings = update.schedule_warnings
    return signalling
runner.train.build_update = build_signalling
sys.argv[0] = "robust-train"
from runner.cli import train_main
train_main()
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_torchrun_run_stopped_on_one_rank_resumes_exactly(tmp_path):
    script = tmp_path / "robust_train_stop_rank_1.py"
    script.write_text(ONE_RANK_STOPS)
    # Random attack starts: each rank's RNG matters mid-epoch; BatchNorm: each rank's running statistics.
    overrides = ["+method=at", "method.attack.steps=2", "model=mlp", "model.hidden=[16]", "train.epochs=2",
                 "eval=none", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}

    def torchrun(run_dir, stop: bool) -> int:
        done = subprocess.run(
            [str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", sys.executable, str(script), *overrides,
             f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env={**env, **({"STOP_RANK_1": "1"} if stop else {})}, capture_output=True, text=True,
            timeout=300)
        return done.returncode

    assert torchrun(tmp_path / "whole", stop=False) == 0
    assert torchrun(tmp_path / "stopped", stop=True) != 0
    status = json.loads((tmp_path / "stopped" / "status.json").read_text())
    assert status["status"] == "interrupted" and "in epoch 2 after batch 10" in status["error"], status
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=False)
    assert len(state["rng_per_rank"]) == 2
    assert torchrun(tmp_path / "stopped", stop=False) == 0  # resumed
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
