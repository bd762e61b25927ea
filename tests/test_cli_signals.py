"""Ctrl-C: during training it checkpoints the exact mid-epoch state like SIGTERM/SIGUSR1 (exit 130), says
why it stopped, and while the console script is still importing it is one line and exit 130."""

import json
import signal
import subprocess
import sys

import pytest

from runner import checkpoint
from runner.config import compose
from runner.errors import RunInterrupted


def small_config():
    return compose(["model=mlp", "model.hidden=[16]", "train.epochs=1", "train.batch_size=256", "eval=none",
                    "device=cpu", "train.progress=plain"])


def test_ctrl_c_in_training_checkpoints_mid_epoch(tmp_path, monkeypatch, wrap_method_loss, signal_on_call):
    import runner.train

    wrap_method_loss(monkeypatch, signal_on_call(2, signal.SIGINT))
    with pytest.raises(RunInterrupted) as stopped:
        runner.train.run(small_config(), tmp_path)
    assert stopped.value.signum == signal.SIGINT and 128 + stopped.value.signum == 130
    assert "Ctrl-C" in str(stopped.value) and "checkpointed" in str(stopped.value)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and "Ctrl-C" in status["error"]
    assert "interrupted: stopped by Ctrl-C" in (tmp_path / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_stops_at_once():
    from runner.tracking import StopRequests

    stop = StopRequests()
    try:
        with stop.deferred():
            signal.raise_signal(signal.SIGINT)  # recorded for the next step boundary
            assert stop.requested
            with pytest.raises(RunInterrupted, match="Ctrl-C"):
                signal.raise_signal(signal.SIGINT)
    finally:
        stop.close()


def test_ctrl_c_while_the_console_script_starts_is_one_line(tmp_path):
    """The handler the console script has while importing torch and Hydra (before `_main`)."""
    code = ("import os, signal, sys, time; sys.argv = ['robust-train']; import runner.cli; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(60)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["robust-train: interrupted (Ctrl-C) while starting; nothing was written"], out.stderr


def test_an_interruption_re_raised_from_its_text_keeps_its_signal():
    """OmegaConf re-raises an exception raised inside its code as type(err)(its message): a stop signal
    arriving while a config is read must still end the run as interrupted (and requeue on SIGUSR1), not
    as a TypeError from RunInterrupted's constructor, recorded as a failed run."""
    from omegaconf._utils import format_and_raise

    from runner.errors import RunInterrupted

    cause = RunInterrupted(signal.SIGUSR1, "stopped by SIGUSR1 in epoch 2 after batch 3, checkpointed")
    with pytest.raises(RunInterrupted) as info:
        format_and_raise(node=None, key="train.epochs", value=None, msg=str(cause), cause=cause)
    assert info.value.signum == signal.SIGUSR1 and "epoch 2" in str(info.value)
