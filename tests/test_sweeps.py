"""Sweeps: Hydra multirun through the joblib and submitit launchers (complete, separate runs), the
background launch script, the SLURM presets' sbatch script, and requeue-and-resume of a submitit job
stopped by the time-limit signal."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "eval=none"]


def _env() -> dict:
    # One thread per run: several runs share these cores, and torch's default (all cores each) thrashes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _assert_four_complete_runs(sweep_dir: Path) -> None:
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [r.name for r in runs] == [
        "method-at+seed-0+train.epochs-1", "method-at+seed-1+train.epochs-1",
        "method-erm+seed-0+train.epochs-1", "method-erm+seed-1+train.epochs-1",
    ]
    for run_dir in runs:
        assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
        results = json.loads((run_dir / "results.json").read_text())
        method, seed = run_dir.name.split("+")[:2]
        assert results["run"]["method"] == method.split("-")[1]
        assert results["run"]["seed"] == int(seed.split("-")[1])
        assert results["train"]["steps"] > 0
        assert (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_joblib_sweep_launched_in_the_background_gives_four_complete_runs(tmp_path):
    sweep_dir = tmp_path / "joblib sweep"  # a space: the directory reaches Hydra quoted
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "launch_sweep.py"), "--wait", "--sweep-dir", str(sweep_dir),
         "+method=erm,at", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    log = (sweep_dir / "sweep.log").read_text() if (sweep_dir / "sweep.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-3000:]
    assert f"runs:     {sweep_dir}" in proc.stdout
    assert (sweep_dir / "sweep.exit").read_text().strip() == "0"
    _assert_four_complete_runs(sweep_dir)


@pytest.mark.slow
def test_submitit_local_sweep_gives_four_complete_runs(tmp_path):
    """Without OMP_NUM_THREADS, as a user launches it: the jobs, all started at once, take a thread each."""
    sweep_dir = tmp_path / "sweep"
    env = {key: value for key, value in _env().items() if key != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [str(BIN / "robust-train"), "-m", "+method=erm,at", "seed=0,1", "hydra/launcher=submitit_local",
         *TINY, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_four_complete_runs(sweep_dir)
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs really went through submitit
    for results in sweep_dir.glob("*/results.json"):
        assert json.loads(results.read_text())["env"]["torch_threads"] == 1


def test_only_submitit_local_jobs_without_omp_num_threads_drop_to_one_thread(monkeypatch):
    import torch

    from runner.distributed import share_cores_with_sibling_jobs

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for executor, expected in [(None, False), ("slurm", False), ("local", True)]:
            torch.set_num_threads(2)
            if executor is None:
                monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
            else:
                monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
            assert share_cores_with_sibling_jobs() is expected
            assert torch.get_num_threads() == (1 if expected else 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting wins
        torch.set_num_threads(2)
        assert share_cores_with_sibling_jobs() is False and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_sweeping_a_key_left_out_of_run_names_still_gives_each_job_its_own_directory(tmp_path):
    """eval is not part of a run's name (the same training lands in one directory); swept, it must be, or
    two jobs train into one directory and the second results.json replaces the first."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [str(BIN / "robust-train"), "-m", "eval=none,quick", "train.epochs=1", "device=cpu",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep_dir.glob("*/results.json"))
    assert runs == ["eval-none+train.epochs-1", "eval-quick+train.epochs-1"]  # device=cpu is not swept
    quick = json.loads((sweep_dir / runs[1] / "results.json").read_text())
    assert "clean/acc" in quick["metrics"]


def test_sweep_names_without_a_multirun_record_are_run_names(tmp_path):
    from runner.cli import run_name, sweep_name

    excluded = ["eval"]
    job = ["+method=at", "seed=0", "eval=full"]
    assert sweep_name(job, excluded, str(tmp_path)) == run_name(job, excluded) == "method-at+seed-0"
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['+method=at', 'eval=quick,full']\n")
    assert sweep_name(["+method=at", "eval=full"], excluded, str(tmp_path)) == "method-at+eval-full"


def test_evaluation_keys_stay_out_of_run_names_unless_a_sweep_varies_them(tmp_path):
    from runner.cli import run_name, sweep_name

    evaluators = "++eval.evaluators=[{name:clean},{name:pgd,steps:5}]"  # a value with commas
    assert run_name(["+method=at", "eval.seed=3", evaluators]) == "method-at"
    assert run_name(["+method=at", "model.hidden=[64,64]"]) == "method-at+model.hidden-_64+64_"  # as before
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['+method=at', 'eval.seed=0,1']\n")
    assert sweep_name(["+method=at", "eval.seed=1"], [], str(tmp_path)) == "method-at+eval.seed-1"


def test_the_run_directory_of_a_command_leaves_out_its_evaluation_keys(compose_cfg):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    import runner.cli  # noqa: F401 - registers the resolvers

    def run_dir(*overrides):
        with initialize_config_module(config_module="runner.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return cfg.hydra.run.dir

    plain = run_dir("+method=at", "seed=1")
    assert plain == "outputs/runs/method-at+seed-1"
    assert run_dir("+method=at", "seed=1", "eval=full", "device=cpu", "eval.seed=4",
                   "eval.evaluators=[{name:clean},{name:pgd,steps:5}]") == plain


@pytest.mark.slow
def test_submitit_job_stopped_by_the_time_limit_signal_is_requeued_and_resumes(tmp_path):
    """SIGUSR1 (what the slurm presets have SLURM send before the time limit) mid-epoch: the run
    checkpoints, submitit requeues the job, and the new attempt resumes in the same run directory."""
    sweep_dir = tmp_path / "sweep"
    sweep = subprocess.Popen(
        [str(BIN / "robust-train"), "-m", "+method=at", "train.epochs=3", "train.log_every=1",
         "hydra/launcher=submitit_local", *TINY[1:], f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        run_dir = sweep_dir / "method-at+train.epochs-3"
        deadline = time.monotonic() + 240
        while "step 2 " not in _read(run_dir / "train.log"):
            assert sweep.poll() is None and time.monotonic() < deadline, _read(run_dir / "train.log")
            time.sleep(0.1)
        job_pid = int((run_dir / ".lock").read_text())  # the process training in this run directory
        os.kill(job_pid, signal.SIGUSR1)
        output, _ = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output[-4000:]
    log = _read(run_dir / "train.log")
    assert "stopped by SIGUSR1" in log
    assert "resumed in epoch 1 after batch" in log  # mid-epoch, in the same directory
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "results.json").read_text())["train"]["steps"] == 3 * 21
    submitit_logs = "".join(_read(p) for p in (sweep_dir / ".submitit").rglob("*.err"))
    assert "Caught signal" in submitit_logs  # submitit's own pre-emption handler did the requeue


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# ---- SLURM presets (no cluster needed: the sbatch script is written, not submitted) -----------------------

@pytest.mark.parametrize(("preset", "gpus", "tasks"), [("slurm_gpu", 1, 1), ("slurm_gpu_ddp", 4, 4)])
def test_slurm_presets_ask_for_gpus_and_the_checkpoint_signal(preset, gpus, tasks, tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import OmegaConf

    from runner.config import register_configs

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that SLURM is installed
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    register_configs()
    overrides = [f"hydra/launcher={preset}", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}/s"]
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    launcher = SlurmLauncher(**params)
    launcher.config = cfg

    class Submitted(Exception):
        pass

    def capture(executor, function, *arguments):
        command = "python -m submitit.core._submit x"
        raise Submitted(executor._executor._make_submission_file_text(command, "u"))

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], 0)
    script = str(submitted.value)
    assert f"#SBATCH --gpus-per-node={gpus}\n" in script
    assert f"#SBATCH --ntasks-per-node={tasks}\n" in script
    assert "#SBATCH --partition=gpu\n" in script
    assert "#SBATCH --signal=USR1@120\n" in script  # the run checkpoints on USR1 (not submitit's USR2)
    assert f"#SBATCH --time={params['timeout_min']}\n" in script
    assert params["max_num_timeout"] > 0  # requeues allowed
