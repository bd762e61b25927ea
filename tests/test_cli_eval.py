"""robust-eval: a directory of its own even when two evaluations (or two sweeps, of either command) start in the
same second, the checkpoint's training keys cannot be overridden, and a stopped evaluation says it starts over
rather than resumes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import runner.cli  # noqa: F401 - registers the resolvers the eval config uses
from runner import checkpoint
from runner.config import compose
from runner.data import dataset_info
from runner.errors import ConfigError, RunInterrupted
from runner.models import build_model
from runner.reevaluate import prepare, reevaluate
from runner.tracking import reserve_run_dir
from runner.train import model_checkpoint

CLEAN_ONLY = "eval.evaluators=[{name: clean}]"


@pytest.fixture(scope="module")
def erm_checkpoint(tmp_path_factory) -> Path:
    cfg = compose(["model=mlp", "model.hidden=[16]"])
    path = tmp_path_factory.mktemp("ckpt") / "erm.pt"
    checkpoint.save(model_checkpoint(cfg, build_model(cfg.model, dataset_info(cfg.dataset)), {"epoch": 1}), path)
    return path


def test_reserve_run_dir_never_hands_out_a_directory_twice(tmp_path):
    first = reserve_run_dir(tmp_path / "evals" / "2024-01-01_00-00-00")
    second = reserve_run_dir(first)
    assert first.name == "2024-01-01_00-00-00" and second.name == "2024-01-01_00-00-00-2"
    assert first.is_dir() and second.is_dir()


# A child robust-eval (or robust-train) whose pre-flight finds its directory (a run's, or a sweep's first
# job's) taken by another process started in the same second.
CHILD = """
import pathlib
import sys
import runner.preflight as v
original = v.PREFLIGHT
def taken(*args, **kwargs):
    run_dir = original(*args, **kwargs)
    pathlib.Path(run_dir, "JOB").mkdir(parents=True)
    pathlib.Path(run_dir, "JOB", "results.json").write_text("theirs")
    print("TAKEN", run_dir, file=sys.stderr)
    return run_dir
v.PREFLIGHT = taken
sys.argv = ["COMMAND", *sys.argv[1:]]
from runner.cli import MAIN
MAIN()
"""


def _evaluate_beside_a_taken_directory(tmp_path, preflight: str, job: str, argv: list[str],
                                       command: str = "robust-eval") -> tuple[Path, Path]:
    """(the taken directory, the one the child wrote to instead)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    main = "eval_main" if command == "robust-eval" else "train_main"
    child = CHILD.replace("PREFLIGHT", preflight).replace("JOB", job).replace("COMMAND", command)
    child = child.replace("MAIN", main)
    out = subprocess.run([sys.executable, "-c", child, *argv, CLEAN_ONLY, "device=cpu"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    taken = tmp_path / next(line.split()[1] for line in out.stderr.splitlines() if line.startswith("TAKEN"))
    assert (taken / job / "results.json").read_text() == "theirs"
    return taken, taken.with_name(taken.name + "-2")


def test_two_evaluations_in_the_same_second_get_a_directory_each(tmp_path, erm_checkpoint):
    _, mine = _evaluate_beside_a_taken_directory(tmp_path, "preflight_eval", "", [f"ckpt={erm_checkpoint}"])
    assert json.loads((mine / "results.json").read_text())["metrics"]["clean/acc"] >= 0


def test_two_evaluation_sweeps_in_the_same_second_get_a_directory_each(tmp_path, erm_checkpoint):
    argv = ["-m", f"ckpt={erm_checkpoint}", "eval.n_examples=20,40"]
    _, mine = _evaluate_beside_a_taken_directory(tmp_path, "preflight_sweep", "0", argv)
    assert [json.loads((mine / job / "results.json").read_text())["eval"]["clean/acc"]["n_examples"]
            for job in ("0", "1")] == [20, 40]


def test_two_training_sweeps_in_the_same_second_get_a_directory_each(tmp_path):
    argv = ["-m", "model=mlp", "model.hidden=[8]", "train.epochs=1", "seed=0,1"]
    _, mine = _evaluate_beside_a_taken_directory(tmp_path, "preflight_sweep", "another-sweep", argv, "robust-train")
    assert [json.loads(path.read_text())["run"]["seed"] for path in sorted(mine.glob("*/results.json"))] == [0, 1]


@pytest.mark.parametrize("override, named", [("+method=at", "method.name='at'"), ("model=cnn_small", "model.name"),
                                             ("dataset.test_size=100", "dataset.test_size"), ("seed=3", "seed")])
def test_training_keys_come_from_the_checkpoint(erm_checkpoint, override, named):
    overrides = [f"ckpt={erm_checkpoint}", override]
    with pytest.raises(ConfigError) as info:
        prepare(compose(overrides, config_name="eval"), overrides)
    assert named in str(info.value) and "erm, mlp, digits" in str(info.value)


def test_evaluation_keys_may_change(erm_checkpoint, tmp_path):
    overrides = [f"ckpt={erm_checkpoint}", "threat.eps=0.05", f"dataset.data_dir={tmp_path}", CLEAN_ONLY]
    _, _, cfg, _ = prepare(compose(overrides, config_name="eval"), overrides)
    assert cfg.threat.eps == 0.05 and cfg.model.name == "mlp"


def test_a_stopped_evaluation_does_not_promise_a_resume(erm_checkpoint, tmp_path, monkeypatch):
    import runner.reevaluate

    def evaluate_and_get_stopped(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not stopped")

    monkeypatch.setattr(runner.reevaluate, "evaluate", evaluate_and_get_stopped)
    overrides = [f"ckpt={erm_checkpoint}", CLEAN_ONLY, "device=cpu"]
    with pytest.raises(RunInterrupted) as info:
        reevaluate(compose(overrides, config_name="eval"), overrides, tmp_path / "run")
    assert "does not resume" in str(info.value) and "to resume" not in str(info.value)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and "does not resume" in status["resume"]


@pytest.mark.parametrize("status, unfinished", [
    ({"status": "interrupted"}, "run that robust-train command again"),
    ({"status": "failed", "error": "NonFiniteLoss: ..."}, "its training failed"),
    ({"status": "failed", "trained": True}, None),  # trained to the end, then its evaluation failed
    ({"status": "completed", "trained": True}, None),
])
def test_a_checkpoint_from_unfinished_training_says_so(tmp_path, status, unfinished):
    from runner.reevaluate import training_record, unfinished_training

    cfg = compose(["model=mlp", "model.hidden=[16]", "train.epochs=6"])
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save(model_checkpoint(cfg, build_model(cfg.model, dataset_info(cfg.dataset)), {"epoch": 2}), path)
    (tmp_path / "run" / "status.json").write_text(json.dumps(status))
    train, _ = training_record(path, checkpoint.load(path))
    assert train.get("training_status") == (status["status"] if unfinished else None)
    warning = unfinished_training(train)
    assert (warning is not None) == (unfinished is not None)
    if unfinished:
        assert "from epoch 2 of 6" in warning and unfinished in warning


def test_status_json_says_when_training_is_over_before_the_evaluation_runs(tmp_path, monkeypatch):
    import runner.train

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(runner.train, "evaluate", failing_evaluation)
    cfg = compose(["model=mlp", "model.hidden=[8]", "train.epochs=1", CLEAN_ONLY])
    with pytest.raises(RuntimeError):
        runner.train.run(cfg, tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["trained"] is True
