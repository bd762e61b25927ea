"""Checkpoints are data, written so that no crash loses more than the state being written, and checked
on load; a diverging run stops with a clear message and leaves its last good checkpoint loadable."""

import errno
import json
import multiprocessing
import os
import pickle
import warnings

import pytest
import torch

from runner import checkpoint
from runner.checkpoint import CheckpointError
from runner.config import compose
from runner.errors import NonFiniteLoss, describe

PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["runner.checkpoint"])


def state(value: float = 1.0, epoch: int = 1) -> dict:
    return {
        "model": {"0.weight": torch.full((3, 2), value), "1.num_batches_tracked": torch.tensor(7)},
        "config": {"model": {"name": "mlp", "hidden": [32]}},
        "epoch": epoch, "best_score": 0.5,
    }


def test_round_trip_verifies_format_and_hash(tmp_path):
    checkpoint.save(state(), tmp_path / "a.pt")
    loaded = checkpoint.load(tmp_path / "a.pt")
    assert loaded["format"] == checkpoint.FORMAT and loaded["epoch"] == 1
    assert torch.equal(loaded["model"]["0.weight"], state()["model"]["0.weight"])


@pytest.mark.parametrize("change", ["tensor element", "0-d tensor", "config value", "scalar"])
def test_any_changed_value_fails_the_content_hash(tmp_path, change):
    checkpoint.save(state(), tmp_path / "a.pt")
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    if change == "tensor element":
        saved["model"]["0.weight"][1, 1] += 1e-6
    elif change == "0-d tensor":
        saved["model"]["1.num_batches_tracked"] += 1
    elif change == "config value":
        saved["config"]["model"]["hidden"] = [33]
    else:
        saved["best_score"] = 0.51
    torch.save(saved, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="content hash"):
        checkpoint.load(tmp_path / "a.pt")


def test_code_in_a_pickle_never_runs(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match="not a readable"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_a_directory_or_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "none.pt")


def test_keep_previous_keeps_the_replaced_checkpoint(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(state(1.0, epoch=1), last, keep_previous=True)
    assert not checkpoint.previous_path(last).exists()
    checkpoint.save(state(2.0, epoch=2), last, keep_previous=True)
    assert checkpoint.load(last)["epoch"] == 2
    assert checkpoint.load(checkpoint.previous_path(last))["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no debris


def test_a_failed_write_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    checkpoint.save(state(1.0, epoch=1), last, keep_previous=True)

    def disk_full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(state(2.0, epoch=2), last, keep_previous=True)
    monkeypatch.undo()
    assert checkpoint.load(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _save_twice(path: str) -> None:
    os.environ["ROBUST_TRAIN_TEST_KILL_IN_SAVE"] = "2"  # the child's own: forked from a server
    checkpoint.save(state(1.0, epoch=1), path, keep_previous=True)
    checkpoint.save(state(2.0, epoch=2), path, keep_previous=True)  # SIGKILLed before its rename


def test_killed_between_the_temporary_file_and_the_rename(tmp_path):
    child = PROCESSES.Process(target=_save_twice, args=(str(tmp_path / "last.pt"),))
    child.start()
    child.join(120)
    assert child.exitcode == -9
    assert (tmp_path / ".last.pt.tmp").exists()  # the new state was complete on disk, never renamed
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # last.pt is intact: no fallback
        assert checkpoint.load_latest(tmp_path / "last.pt")["epoch"] == 1


def test_a_truncated_last_falls_back_to_the_previous_good_one(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(state(1.0, epoch=1), last, keep_previous=True)
    checkpoint.save(state(2.0, epoch=2), last, keep_previous=True)
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="previous good checkpoint last.prev.pt"):
        resumed = checkpoint.load_latest(last)
    assert resumed["epoch"] == 1
    assert (tmp_path / "last.corrupt.pt").exists() and not last.exists()
    # the next save must not make the corrupted file the "previous good" one
    checkpoint.save(state(3.0, epoch=2), last, keep_previous=True)
    assert checkpoint.load(checkpoint.previous_path(last))["epoch"] == 1


def test_a_truncated_last_without_a_previous_one_is_an_error(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(state(), last)
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_latest(last)


def test_nothing_to_resume_from_is_none(tmp_path):
    assert checkpoint.load_latest(tmp_path / "last.pt") is None


# ---- numerical faults ------------------------------------------------------------------------------

def small(*overrides):
    base = ["model=mlp", "model.hidden=[32]", "train.batch_size=256", "eval=none", "deterministic=true",
            "device=cpu", "train.progress=plain", "train.log_every=1"]
    return compose(base + list(overrides))


def test_an_absurd_learning_rate_stops_the_run_with_a_clear_message(tmp_path):
    from runner.train import run

    with pytest.raises(NonFiniteLoss) as stopped:
        run(small("optimizer.lr=1e6", "train.epochs=2"), tmp_path)
    message = describe(stopped.value)
    assert "non-finite loss" in message and "optimizer.lr" in message and "1000000.0" in message
    assert "no checkpoint was written yet" in message
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "non-finite" in status["error"]


def test_a_run_diverging_later_keeps_its_last_good_checkpoint_loadable(tmp_path):
    """The learning rate jumps to an absurd 1e6 (x 1e7) half-way: epoch 1 is fine, epoch 2 diverges."""
    from runner.models import build_model
    from runner.train import run

    cfg = small("train.epochs=2", "scheduler=multistep", "scheduler.milestones=[0.5]", "scheduler.gamma=1e7")
    with pytest.raises(NonFiniteLoss) as stopped:
        run(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(last) in describe(stopped.value)
    good = checkpoint.load(last)
    assert good["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())
    from runner.data import dataset_info

    build_model(cfg.model, dataset_info(cfg.dataset)).load_state_dict(good["model"])
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def nan_on_calls(bad_calls: set[int]):
    """A loss wrapper (see the wrap_method_loss fixture): NaN on the given (1-based) calls, isolated spikes."""

    def spiking(n, loss, *args, **kwargs):
        value, logs = loss(*args, **kwargs)
        return (value * float("nan"), logs) if n in bad_calls else (value, logs)

    return spiking


def test_skip_policy_skips_and_counts_isolated_spikes(tmp_path, monkeypatch, wrap_method_loss):
    from runner.train import run

    wrap_method_loss(monkeypatch, nan_on_calls({3}))
    results = run(small("train.epochs=1", "train.nonfinite=skip"), tmp_path)
    assert results["train"]["nonfinite_skipped"] == 1
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("nonfinite")] == [3]


def test_skip_policy_stops_after_max_skips(tmp_path, monkeypatch, wrap_method_loss):
    from runner.train import run

    wrap_method_loss(monkeypatch, nan_on_calls({1, 2, 3}))
    with pytest.raises(NonFiniteLoss, match="more than train.max_skips=2"):
        run(small("train.epochs=1", "train.nonfinite=skip", "train.max_skips=2"), tmp_path)
