"""best.pt's selection key, which checkpoint a run evaluates, and the training process's allocator setting."""

import json
import os
import subprocess
import sys

import pytest

from runner.reevaluate import resolve_checkpoint
from runner.train import evaluated_checkpoint, selection_key


def test_robust_score_first_then_clean_accuracy_breaks_ties():
    earlier = selection_key({"val/score": 0.90, "val/clean_acc": 0.97})
    assert selection_key({"val/score": 0.91, "val/clean_acc": 0.90}) > earlier  # the score decides
    assert selection_key({"val/score": 0.90, "val/clean_acc": 0.98}) > earlier  # a tie: clean decides
    assert not selection_key({"val/score": 0.90, "val/clean_acc": 0.97}) > earlier  # a full tie keeps the first


def test_clean_only_methods_and_checkpoints_from_before_the_tie_break():
    assert selection_key({"val/score": 0.95}) == [0.95, 0.95]
    assert selection_key(0.5) == [0.5, -1.0]  # a bare float best_score in an older last.pt
    assert selection_key([0.5, 0.9]) == [0.5, 0.9]


@pytest.mark.parametrize(
    "method, reported", [("erm", "last"), ("sam", "last"), ("trades", "last"), ("at", "best"), ("hr", "best"),
                         ("ibp", "best"), ("crown_ibp", "best")],
)
def test_auto_evaluates_the_checkpoint_each_reference_reports(method, reported):
    import importlib

    cls = next(v for v in vars(importlib.import_module(f"runner.methods.{method}")).values()
               if isinstance(v, type) and v.__module__.endswith(method) and hasattr(v, "reported_checkpoint"))
    assert evaluated_checkpoint("auto", cls) == reported
    for explicit in ("best", "last"):  # an explicit eval.checkpoint is never second-guessed
        assert evaluated_checkpoint(explicit, cls) == explicit


def test_a_run_directory_means_the_checkpoint_its_training_evaluated(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("best.pt", "last.pt"):
        (ckpts / name).write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == ckpts / "best.pt"  # no results.json (training not finished)
    (tmp_path / "results.json").write_text(json.dumps({"train": {"checkpoint": "last"}}))
    assert resolve_checkpoint(tmp_path) == ckpts / "last.pt"
    (tmp_path / "results.json").write_text("{not json")
    assert resolve_checkpoint(tmp_path) == ckpts / "best.pt"


def _allocator_in_fresh_process(env_value):
    env = {k: v for k, v in os.environ.items() if k != "ROBUST_TRAIN_MALLOC"}
    if env_value is not None:
        env["ROBUST_TRAIN_MALLOC"] = env_value
    code = "from runner.allocator import keep_freed_memory as k; print(k(), k())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_setting_applies_once_and_can_be_turned_off():
    assert _allocator_in_fresh_process(None).split() == ["True", "True"]
    assert _allocator_in_fresh_process("system").split() == ["False", "False"]
