"""Multi-process training (DistributedDataParallel) and SLURM requeueing.

`torchrun --nproc_per_node=N --no-python robust-train ...` (or a submitit SLURM job with several tasks)
gives every process a rank. Each process then:
- trains on its contiguous share of every global batch: `train.batch_size` stays the global batch, so a
  run on N processes takes the optimisation steps a single process would (`InMemoryLoader`);
- generates its own attacks on its share (attacks never communicate);
- all-reduces gradients through DDP (gloo on CPU, NCCL on GPU). SAM's first backward skips the
  all-reduce (`runner.update` enters `model.no_sync()`), so its ascent direction is per process;
- writes nothing unless it is rank 0 (logs, metrics, checkpoints, results).

BatchNorm normalises with each process's own share (as DDP always does); the running statistics are
averaged across processes before every validation and checkpoint, so rank 0 saves the mean.
"""

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def detect() -> Processes:
    """This process's rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or from a
    submitit job with several tasks (which then exports the same variables for torch)."""
    if _int_env("WORLD_SIZE") is None and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment

        if JobEnvironment().num_tasks > 1:  # hydra.launcher.tasks_per_node (or nodes) > 1
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    world_size = _int_env("WORLD_SIZE") or 1
    rank = _int_env("RANK") or 0
    local_rank = _int_env("LOCAL_RANK")
    return Processes(rank, world_size, rank if local_rank is None else local_rank)


def share_cores_with_sibling_jobs() -> bool:
    """One torch thread per process in a job of submitit's local executor, unless OMP_NUM_THREADS says
    otherwise; True when it set that. The executor starts every job of a sweep at once, each with torch's
    default of a thread per core and no CPU affinity to bound it, so N jobs oversubscribe the cores N
    times and OpenMP's waiting threads slow each other far beyond N-fold (4 digits jobs on 2 cores: 3.7
    min instead of joblib's 32 s). joblib's workers run one thread each for the same reason."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or os.environ.get("OMP_NUM_THREADS"):
        return False
    torch.set_num_threads(1)
    return True


def setup(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group when launched with several processes; returns this rank's device
    (cuda:LOCAL_RANK on GPUs). A GPU run's device becomes the current CUDA device, also in a single process
    (device=cuda:1): what the checkpointed CUDA RNG state and pyautoattack's seeding refer to."""
    procs = detect()
    if device.type == "cuda" and procs.enabled:
        if device.index is not None:
            raise ValueError(
                f"device={device} puts all {procs.world_size} processes on one GPU (WORLD_SIZE="
                f"{procs.world_size}); use device=cuda (or auto): each process then takes cuda:LOCAL_RANK"
            )
        device = torch.device("cuda", procs.local_rank % torch.cuda.device_count())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if not procs.enabled:
        return procs, device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=procs.rank, world_size=procs.world_size)
    return procs, device


_final_group = None  # after training: the group whose barrier waits for rank 0's evaluation


def after_training(procs: Processes) -> None:
    """Called by every process when training is over. Rank 0 then evaluates alone (no collective) while the
    others wait for it in `teardown`, on a group of their own: the default group's timeout (30 min on gloo,
    10 on NCCL) is shorter than an AutoAttack evaluation, and a rank that left early can abort on exit
    (gloo's threads), which makes torchrun stop rank 0 mid-evaluation. The group is gloo's whatever the
    default backend: an NCCL group sets up its communicator at its first collective, and ranks > 0 would
    then wait for rank 0's NCCL id under the store's default timeout while rank 0 evaluates
    (pytorch#107177); a gloo barrier is a CPU barrier that honours the group's own timeout."""
    global _final_group
    if procs.enabled and dist.is_initialized():
        _final_group = dist.new_group(timeout=datetime.timedelta(days=7), backend="gloo")


def teardown(procs: Processes, finished: bool = True) -> None:
    """Leave the process group. After a normal finish every rank waits for the others first (after
    training, for rank 0's evaluation whatever its outcome): a rank that destroys its gloo group while
    rank 0 is still working aborts the whole job (SIGABRT)."""
    global _final_group
    if procs.enabled and dist.is_initialized():
        if _final_group is not None:
            dist.barrier(group=_final_group)
        elif finished:
            # NCCL needs to know this rank's GPU (else it guesses, and may pick another rank's).
            on_gpu = dist.get_backend() == "nccl"
            dist.barrier(device_ids=[torch.cuda.current_device()] if on_gpu else None)
        _final_group = None
        dist.destroy_process_group()


def wrap_model(model: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """The model the update step calls: DDP around `model` when there are several processes.

    broadcast_buffers=False: attacks call the model many times per step, and a buffer broadcast on
    every call would cost more than the attack; `average_buffers` reconciles BatchNorm statistics.
    """
    if not procs.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # Newer torch renames the switch; the parameters and buffers are still made equal once, at wrap time.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


@torch.no_grad()
def average_buffers(model: nn.Module, procs: Processes) -> None:
    """Mean of the BatchNorm running statistics over all processes. Only those: other buffers are
    constants every process holds alike (Normalize's mean and std), which a sum and a division by 3, 6 or
    7 would move by an ulp; num_batches_tracked counts the same steps on every process."""
    if not procs.enabled:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:  # track_running_stats=False
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                    buffer.div_(procs.world_size)


def _flag_device():
    """Where a one-number collective's tensor lives: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def shared_signal(signum: int | None, procs: Processes) -> int | None:
    """A stop signal any process received (the largest number if several), the same on every process."""
    if not procs.enabled:
        return signum
    shared = torch.tensor([float(signum or 0)], device=_flag_device())
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return int(shared.item()) or None


def stop_agreed(stop, procs: Processes) -> bool:
    """Whether any process received a stop signal (outside a step: at an epoch's end), decided the same on
    every process; a signal that arrives during the agreement stays pending in `stop` for the next one."""
    shared = shared_signal(stop.signum, procs)
    if shared:
        stop.signum = stop.signum or shared
    return shared is not None


def gather_objects(value, procs: Processes) -> list:
    """Every process's `value`, in rank order (one element outside a process group)."""
    if not procs.enabled:
        return [value]
    values = [None] * procs.world_size
    dist.all_gather_object(values, value)
    return values


def agree(flag: bool, procs: Processes) -> bool:
    """Rank 0's `flag` on every process (a decision only rank 0 measured, such as stopping early)."""
    if not procs.enabled:
        return flag
    shared = torch.tensor([float(flag)], device=_flag_device())
    dist.broadcast(shared, src=0)
    return bool(shared.item())


def gather_batch(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The global batch's 1-D `values` (every process's share, in rank order) and the index where this
    process's share starts: for losses that couple the examples of a batch, such as HR's worst-case
    weights. Outside a process group: `values` itself and 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.zeros(world, dtype=torch.long, device=values.device)
    sizes[rank] = len(values)
    dist.all_reduce(sizes)
    sizes = sizes.tolist()
    padded = values.new_zeros(max(sizes))  # all_gather needs one shape; shares differ by at most one
    padded[: len(values)] = values
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]), sum(sizes[:rank])


class ShardedMethod:
    """A method whose loss is computed on this process's share of the global batch.

    DDP averages gradients over processes, which is the global batch mean only when every share has the
    same size; the loss is scaled by world_size · n_share / n_global so that uneven shares (the last
    batch) still give the single-process gradient. One small all-reduce per loss also makes the
    processes agree on two things a lone process must never decide alone, or the others would wait in
    the next all-reduce forever: a non-finite loss on any process is non-finite on all (every process
    skips the step), and a stop signal received by any process stops all at the same step boundary.
    Everything else (setup, validate, select_on) is the wrapped method's.
    """

    def __init__(self, method, procs: Processes, stop=None):
        self.method, self.procs, self.stop = method, procs, stop

    def __getattr__(self, name):
        return getattr(self.method, name)

    def loss(self, model, x, y, ctx):
        loss, logs = self.method.loss(model, x, y, ctx)
        signum = (self.stop.signum or 0) if self.stop is not None else 0
        shared = torch.tensor([float(len(y)), 0.0, float(signum > 0), float(signum)], device=loss.device)
        shared[1] = (~torch.isfinite(loss.detach())).float()
        dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        n_global, nonfinite, stopped, signum_sum = shared.tolist()
        if self.stop is not None:
            # The step's stop decision is this shared one: a signal arriving after the all-reduce waits for
            # the next step's, so no process ever stops a step before the others.
            self.stop.agreed = stopped > 0
            if stopped and self.stop.signum is None:
                self.stop.signum = round(signum_sum / stopped)
        if nonfinite:
            return loss.detach() * float("nan"), logs
        return loss * (self.procs.world_size * len(y) / n_global), logs


def shard_method(method, procs: Processes, stop=None):
    """The method the update step calls: `ShardedMethod` when there are several processes."""
    return ShardedMethod(method, procs, stop) if procs.enabled else method


class SilentTracker:
    """Rank > 0's tracker: every call is accepted and nothing is written (rank 0 logs for all)."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ---- SLURM requeue through submitit ---------------------------------------------------------------------

# What SLURM is told to send before the time limit (the slurm_* launcher presets: USR1; submitit's default:
# USR2). SIGTERM is scancel's (and pre-emption's, which SLURM requeues itself): it never requeues.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def requeue_if_submitit(signum: int | None) -> None:
    """In a submitit job stopped by a time-limit signal (after its checkpoint), hand over to submitit's
    own pre-emption handler: it re-submits the same launcher call (same sweep directory and job
    subdirectory, so `resume=auto` finds checkpoints/last.pt) and exits the process. Call it after the
    run's own signal handlers are restored. Outside submitit, or for another signal, it returns and
    the run ends as interrupted.
    """
    if signum not in REQUEUE_SIGNALS or "SUBMITIT_FOLDER" not in os.environ:
        return
    from submitit.core.job_environment import JobEnvironment

    submitit_signal = JobEnvironment._usr_sig()
    handler = signal.getsignal(submitit_signal)
    if getattr(handler, "__name__", "") == "checkpoint_and_try_requeue":
        handler(submitit_signal, None)  # requeues, then exits
