"""best.pt's selection key, and the training process's allocator setting."""

import os
import subprocess
import sys

import pytest

from runner.train import selection_key


def test_robust_score_first_then_clean_accuracy_breaks_ties():
    earlier = selection_key({"val/score": 0.90, "val/clean_acc": 0.97})
    assert selection_key({"val/score": 0.91, "val/clean_acc": 0.90}) > earlier  # the score decides
    assert selection_key({"val/score": 0.90, "val/clean_acc": 0.98}) > earlier  # a tie: clean decides
    assert not selection_key({"val/score": 0.90, "val/clean_acc": 0.97}) > earlier  # a full tie keeps the first


def test_clean_only_methods_and_checkpoints_from_before_the_tie_break():
    assert selection_key({"val/score": 0.95}) == [0.95, 0.95]
    assert selection_key(0.5) == [0.5, -1.0]  # a bare float best_score in an older last.pt
    assert selection_key([0.5, 0.9]) == [0.5, 0.9]


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
