"""Logging never blocks a run, and a run records what reproducing it needs.

wandb: the mode is decided before the run (offline without credentials), a failing init is a warning
and the run goes on with its local logs, and the wandb run is always finished, also on failure.
Reproducibility: deterministic=true CPU runs are bit-identical; results.json carries the versions, the
device, the git commit, the seed and the full resolved config.
"""

import json
import sys
import types

import pytest
import torch

from runner import checkpoint
from runner.config import compose
from runner.errors import NonFiniteLoss


def small(*overrides):
    base = ["model=mlp", "model.hidden=[32]", "train.epochs=1", "train.batch_size=256", "eval=none",
            "deterministic=true", "device=cpu", "train.progress=plain", "train.log_every=2"]
    return compose(base + list(overrides))


class FakeWandb:
    """Records what the Tracker asks of wandb; `fail_modes` makes init raise for those modes."""

    def __init__(self, fail_modes=()):
        self.fail_modes, self.inits, self.runs = set(fail_modes), [], []
        self.Settings = lambda **kwargs: kwargs

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if kwargs["mode"] in self.fail_modes:
            raise RuntimeError(f"cannot reach wandb ({kwargs['mode']})")
        run = types.SimpleNamespace(id="run123", logged=[], finished_with=None, preempting=False)
        run.log = lambda row, step: run.logged.append((step, row))
        run.finish = lambda exit_code: setattr(run, "finished_with", exit_code)
        run.mark_preempting = lambda: setattr(run, "preempting", True)
        self.runs.append(run)
        return run


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(**kwargs):
        fake = FakeWandb(**kwargs)
        monkeypatch.setitem(sys.modules, "wandb", fake)
        return fake

    return install


def test_wandb_offline_writes_a_local_run_and_finishes(tmp_path, monkeypatch):
    from runner.train import run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(small("logger=wandb", "logger.mode=offline"), tmp_path)
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    run_id = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["logger_run_id"]
    assert run_id and offline_run.name.endswith(run_id)


def test_a_failing_wandb_init_is_a_warning_and_the_run_goes_on(tmp_path, fake_wandb):
    from runner.train import run

    fake = fake_wandb(fail_modes={"offline", "online"})
    with pytest.warns(UserWarning, match="wandb could not start"):
        results = run(small("logger=wandb", "logger.mode=offline"), tmp_path)
    assert len(fake.inits) == 1 and results["metrics"] == {}
    assert (tmp_path / "results.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count('"kind": "train"') >= 1


def test_an_online_init_failure_falls_back_to_offline(tmp_path, fake_wandb):
    from runner.train import run

    fake = fake_wandb(fail_modes={"online"})
    with pytest.warns(UserWarning, match="trying offline"):
        run(small("logger=wandb", "logger.mode=online"), tmp_path)
    assert [i["mode"] for i in fake.inits] == ["online", "offline"]
    assert fake.runs[0].finished_with == 0 and fake.runs[0].logged


def test_auto_mode_without_credentials_is_offline(tmp_path, fake_wandb, monkeypatch):
    from runner.train import run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    fake = fake_wandb()
    run(small("logger=wandb", "logger.mode=auto"), tmp_path / "run")
    assert [i["mode"] for i in fake.inits] == ["offline"]


def test_wandb_is_finished_when_the_run_fails(tmp_path, fake_wandb):
    from runner.train import run

    fake = fake_wandb()
    with pytest.raises(NonFiniteLoss):
        run(small("logger=wandb", "logger.mode=offline", "optimizer.lr=1e6"), tmp_path)
    assert fake.runs[0].finished_with == 1


def test_local_logs_status_and_metrics(tmp_path):
    from runner.train import run

    run(small("train.epochs=2"), tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "mlp" in log and "epoch epoch=2" in log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    # Step rows name the epoch their step belongs to in the same numbering: step s (a count) of epoch
    # ceil(s / steps per epoch), and the epoch row's step is its last step.
    per_epoch = next(r["step"] for r in rows if r["kind"] == "epoch")
    steps = [(r["step"], r["epoch"]) for r in rows if r["kind"] == "train"]
    assert steps and all(epoch == -(-step // per_epoch) for step, epoch in steps)
    assert {epoch for _, epoch in steps} == {1, 2}
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"


def test_deterministic_cpu_runs_are_bit_identical_and_record_their_environment(tmp_path):
    from omegaconf import OmegaConf

    from runner.train import run

    cfg = compose(["+method=at", "method.attack.steps=2", "train.epochs=1", "train.batch_size=256",
                   "eval=quick", "eval.n_examples=50", "deterministic=true", "device=cpu", "seed=3",
                   "train.progress=plain"])
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["metrics"] == second["metrics"]

    env = first["env"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert "git" in env and "git_dirty" in env  # None outside a git checkout
    assert env["seed"] == 3 and env["deterministic"] is True
    assert env["versions"]["numpy"] and env["versions"]["hydra-core"] and env["versions"]["omegaconf"]
    assert first["run"]["seed"] == 3
    assert first["config"] == OmegaConf.to_container(cfg, resolve=True)
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["config"]["method"]["attack"]["steps"] == 2 and on_disk["env"]["seed"] == 3


def test_an_interrupted_run_is_marked_preempted_not_crashed(tmp_path, fake_wandb):
    from runner.tracking import Tracker

    fake = fake_wandb()
    tracker = Tracker(tmp_path, small("logger=wandb", "logger.mode=offline"))
    tracker.status("interrupted", signal=15)
    tracker.finish(1)
    assert fake.runs[0].preempting and fake.runs[0].finished_with == 1
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "interrupted"


def test_a_failed_run_names_its_error_in_the_log_file(tmp_path):
    from runner.data import DatasetUnavailable
    from runner.train import run

    with pytest.raises(DatasetUnavailable):
        run(small("dataset=cifar10", "dataset.download=false", f"dataset.data_dir={tmp_path / 'none'}"), tmp_path)
    assert "FAILED: DatasetUnavailable: dataset 'cifar10' was not found" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
