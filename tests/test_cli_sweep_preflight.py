"""`robust-train -m`: every job's composed config is checked before any job starts or the sweeper writes
multirun.yaml, so a bad value fails the whole sweep up front with one line naming the job and the key."""

import sys

import pytest

import runner.cli
from runner.preflight import preflight_sweep, sweep_jobs


def run_cli(monkeypatch, tmp_path, capsys, *argv) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["robust-train", *argv])
    with pytest.raises(SystemExit) as exited:
        runner.cli.train_main()
    return exited.value.code, capsys.readouterr().err


def test_sweep_jobs_are_the_cartesian_product():
    jobs, swept = sweep_jobs(["train.epochs=1", "seed=0,1", "+method=erm,at"])
    assert len(jobs) == 4 and swept == {"seed", "method"}
    assert all("train.epochs=1" in job for job in jobs)


def test_a_good_sweep_passes_the_preflight():
    preflight_sweep(["train.epochs=1", "eval=none", "seed=0,1"])


def test_only_a_time_stamped_sweep_directory_is_handed_back_to_be_reserved(tmp_path):
    """outputs/sweeps/<time> is new by construction (the CLI reserves it, `-2` if taken); a directory the
    command or a config names is where a sweep resumes, and is left as it is."""
    stamped = preflight_sweep(["train.epochs=1", "eval=none", "seed=0,1"])
    assert stamped is not None and "outputs/sweeps/" in str(stamped)
    assert preflight_sweep(["train.epochs=1", "eval=none", "seed=0,1", f"hydra.sweep.dir={tmp_path}/s"]) is None


def test_a_bad_value_in_one_job_fails_the_sweep_before_any_job(monkeypatch, tmp_path, capsys):
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", "train.epochs=1", "eval=none", "threat.eps=0.05,2")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "sweep job 2 of 2 (threat.eps=2)" in lines[0] and "threat.eps" in lines[0]
    assert not (tmp_path / "outputs").exists()  # the good job did not train either


def test_a_sweep_failing_at_composition_keeps_the_old_multirun_yaml(monkeypatch, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("earlier sweep\n")
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", f"hydra.sweep.dir={sweep_dir}", "eval=none",
                        "model=mlp,resnet9000")
    assert code == 1 and "model=resnet9000" in err and "Traceback" not in err
    assert (sweep_dir / "multirun.yaml").read_text() == "earlier sweep\n"


def test_an_empty_sweep_dir_is_rejected(monkeypatch, tmp_path, capsys):
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", "hydra.sweep.dir=", "seed=0,1")
    assert code == 1 and "hydra.sweep.dir" in err, err


def test_a_stop_signal_ends_the_whole_in_process_sweep(monkeypatch, tmp_path, capsys, wrap_method_loss,
                                                        signal_on_call):
    """SIGTERM in job 1 of 3: that job checkpoints, and jobs 2 and 3 never start (Hydra's basic launcher
    would have recorded the first as failed and run the others)."""
    import signal

    wrap_method_loss(monkeypatch, signal_on_call(3, signal.SIGTERM))
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", "model=mlp", "model.hidden=[8]", "train.epochs=2",
                        "eval=none", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 128 + signal.SIGTERM and "the sweep stops here" in err
    jobs = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert len(jobs) == 1 and "seed-0" in jobs[0].name
    assert (jobs[0] / "checkpoints" / "last.pt").exists()
