"""Bad input, clear errors: every malformed `robust-train` / `robust-eval` invocation exits with status 1
and one line on stderr naming the key (or file) and what is allowed, never a traceback.

The battery runs each invocation as its own process through the real entrypoints, all at once: the
processes are forked from a server that imported the runner once (a launch costs a fork, not seconds
of imports). Two invocations also go through the installed console scripts.
"""

import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runner import checkpoint
from runner.config import compose
from runner.data import dataset_info
from runner.models import build_model
from runner.train import model_checkpoint

TIMEOUT_S = 120  # a safety net against a hung invocation, not a speed requirement
CONCURRENCY = 4
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["runner.cli", "runner.train"])


def _invoke(command: str, argv: list[str], cwd: str, log: str) -> None:
    """The child: `<command> <argv>` in `cwd`, stdout and stderr into `log`."""
    from runner.cli import eval_main, train_main

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(cwd)
    os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = [command, *argv]
    (train_main if command == "robust-train" else eval_main)()


class Malicious:
    """A pickle that runs code when unpickled without weights_only: must never run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digits_checkpoint(directory: Path) -> Path:
    """A real robust-train checkpoint of an (untrained) digits cnn_small model."""
    cfg = compose([])
    model = build_model(cfg.model, dataset_info(cfg.dataset))
    path = directory / "digits_cnn_small.pt"
    checkpoint.save(model_checkpoint(cfg, model, {"epoch": 1}), path)
    return path


def files(root: Path) -> dict:
    """Hostile and broken inputs for robust-eval, and the paths the cases refer to."""
    root.mkdir(parents=True, exist_ok=True)
    good = digits_checkpoint(root)
    truncated = root / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    text = root / "notes.pt"
    text.write_text("not a checkpoint\n")
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    malicious = root / "malicious.pt"
    with open(malicious, "wb") as f:
        pickle.dump(Malicious(root / "PWNED"), f)
    tampered = root / "tampered.pt"
    state = torch.load(good, weights_only=True)
    first = next(k for k in state["model"] if state["model"][k].is_floating_point())
    state["model"][first] = state["model"][first] + 1.0  # the stored hash no longer matches
    torch.save(state, tampered)
    (root / "empty_data").mkdir()
    (root / "a_file").write_text("")
    (root / "not_a_run").mkdir()
    return {"good": good, "truncated": truncated, "text": text, "foreign": foreign,
            "malicious": malicious, "tampered": tampered, "root": root}


# (id, command, argv (formatted with the paths above), words the one-line message must contain)
CASES = [
    ("unknown group option", "robust-train", ["model=resnet9000"], ["model=resnet9000", "cnn_small", "mlp"]),
    ("unknown method", "robust-train", ["+method=nope"], ["method=nope", "at", "trades"]),
    ("method without +", "robust-train", ["method=at"], ["+method=at"]),
    ("unknown key", "robust-train", ["train.epoch=5"], ["train.epoch", "unknown key", "train.epochs"]),
    ("unknown key added with +", "robust-train", ["+train.epoch=5"], ["train.epoch", "train.epochs"]),
    ("unknown top-level key", "robust-train", ["lr=0.1"], ["lr", "unknown key", "optimizer"]),
    ("method key without a method", "robust-train", ["method.beta=6"], ["method.beta", "+method="]),
    ("method given twice", "robust-train", ["+method=trades", "+method=at"], ["2 times", "+method=at", "keep one"]),
    ("wrong type int", "robust-train", ["train.epochs=abc"], ["train.epochs=abc", "Integer"]),
    ("wrong type bool", "robust-train", ["deterministic=maybe"], ["deterministic", "bool"]),
    ("unparsable override", "robust-train", ["train.epochs"], ["train.epochs", "key=value"]),
    ("negative eps", "robust-train", ["threat.eps=-0.1"], ["threat.eps", ">= 0"]),
    ("absurd linf eps", "robust-train", ["threat.eps=8"], ["threat.eps", "8/255", "[0, 1]"]),
    ("absurd l2 eps", "robust-train", ["threat.norm=l2", "threat.eps=100"], ["threat.eps", "diameter"]),
    ("unknown norm", "robust-train", ["threat.norm=l3"], ["threat.norm", "linf", "l2"]),
    ("zero batch size", "robust-train", ["train.batch_size=0"], ["train.batch_size=0", "positive"]),
    ("negative epochs", "robust-train", ["train.epochs=-3"], ["train.epochs=-3", "positive"]),
    ("unknown device", "robust-train", ["device=tpu"], ["device", "auto, cpu, cuda"]),
    ("label noise of 1", "robust-train", ["dataset.label_noise=1.0"], ["dataset.label_noise", "[0, 1)"]),
    ("negative learning rate", "robust-train", ["optimizer.lr=-0.1"], ["optimizer.lr", "positive"]),
    ("unknown evaluator", "robust-train", ["eval.evaluators=[{{name: nope}}]"],
     ["eval.evaluators[0]", "nope"]),
    ("missing resume file", "robust-train", ["resume={root}/nowhere.pt"], ["resume", "auto, never"]),
    ("dataset missing offline", "robust-train",
     ["dataset=cifar10", "dataset.download=false", "dataset.data_dir={root}/empty_data"],
     ["cifar10", "dataset.data_dir", "was not found"]),
    ("unwritable output dir", "robust-train", ["hydra.run.dir={root}/a_file/run"],
     ["hydra.run.dir", "is a file"]),
    ("eval without ckpt", "robust-eval", [], ["ckpt is required"]),
    ("eval missing file", "robust-eval", ["ckpt={root}/nowhere.pt"], ["nowhere.pt", "does not exist"]),
    ("eval truncated file", "robust-eval", ["ckpt={truncated}"], ["truncated.pt", "truncated"]),
    ("eval text file", "robust-eval", ["ckpt={text}"], ["notes.pt", "not a readable"]),
    ("eval foreign torch file", "robust-eval", ["ckpt={foreign}"], ["foreign.pt", "not a robust-train"]),
    ("eval malicious pickle", "robust-eval", ["ckpt={malicious}"], ["malicious.pt", "not a readable"]),
    ("eval tampered weights", "robust-eval", ["ckpt={tampered}"], ["tampered.pt", "content hash"]),
    ("eval directory without checkpoints", "robust-eval", ["ckpt={root}/not_a_run"], ["not a run directory"]),
    ("eval model mismatch", "robust-eval", ["ckpt={good}", "model=mlp"], ["cnn_small", "model.name='mlp'"]),
    ("eval unwritable output dir", "robust-eval", ["ckpt={good}", "hydra.run.dir={root}/a_file/x"],
     ["hydra.run.dir", "is a file"]),
]
CONSOLE_CASES = [  # the installed scripts themselves, as a user types them
    ("console: unknown group option", "robust-train", ["dataset=imagenet"], ["dataset=imagenet", "digits"]),
    ("console: model mismatch", "robust-eval", ["ckpt={good}", "model=mlp"], ["cnn_small", "mlp"]),
]


def start(case_id, command, argv, cwd: Path):
    log = cwd / "output.log"
    if case_id.startswith("console"):
        script = Path(sys.executable).with_name(command)
        if not script.exists():
            return None
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        return subprocess.Popen([str(script), *argv], cwd=cwd, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT)
    proc = PROCESSES.Process(target=_invoke, args=(command, argv, str(cwd), str(log)))
    proc.start()
    return proc


def wait(proc) -> int:
    if isinstance(proc, subprocess.Popen):
        return proc.wait(TIMEOUT_S)
    proc.join(TIMEOUT_S)
    return proc.exitcode


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """Run every invocation, CONCURRENCY at a time; {case id: (exit status, output, seconds, cwd)}."""
    paths = files(tmp_path_factory.mktemp("inputs"))
    pending = [(case_id, command, [a.format(**paths) for a in argv])
               for case_id, command, argv, _ in CASES + CONSOLE_CASES]
    running, results = {}, {}
    while pending or running:
        while pending and len(running) < CONCURRENCY:
            case_id, command, argv = pending.pop(0)
            cwd = tmp_path_factory.mktemp("cwd")
            proc = start(case_id, command, argv, cwd)
            if proc is not None:
                running[case_id] = (proc, cwd, time.monotonic())
        case_id = next(iter(running))
        proc, cwd, began = running.pop(case_id)
        code = wait(proc)
        results[case_id] = (code, (cwd / "output.log").read_text(), time.monotonic() - began, cwd)
    yield results, paths
    print("\n".join(f"{k}: exit {v[0]}, {v[2]:.1f}s: {v[1].strip()}" for k, v in results.items()))


@pytest.mark.parametrize("case_id,command,argv,words", CASES + CONSOLE_CASES,
                         ids=[c[0] for c in CASES + CONSOLE_CASES])
def test_malformed_invocation_fails_with_one_clear_line(battery, case_id, command, argv, words):
    results, _ = battery
    if case_id not in results:
        pytest.skip("console scripts are not installed next to this interpreter")
    code, output, _, _ = results[case_id]
    assert code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith(f"{command}: error: "), output
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"


def test_checks_run_before_anything_is_written(battery):
    """Config mistakes are caught before Hydra creates the run directory."""
    results, _ = battery
    for case_id, (_, _, _, cwd) in results.items():
        if case_id != "dataset missing offline" and not case_id.startswith("console"):
            assert not (cwd / "outputs").exists(), f"{case_id} wrote {cwd / 'outputs'}"


def test_a_malicious_checkpoint_never_runs_its_code(battery):
    _, paths = battery
    assert not (paths["root"] / "PWNED").exists()


def test_a_missing_dataset_marks_the_run_failed(battery):
    results, _ = battery
    cwd = results["dataset missing offline"][3]
    (status,) = list(cwd.glob("outputs/runs/*/status.json"))
    assert '"failed"' in status.read_text() and "dataset.data_dir" in status.read_text()


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(
        [sys.executable, "-c", "from runner.cli import train_main; train_main()", "threat.eps=-1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "threat.eps" in out.stderr


def test_describe_leaves_bugs_alone():
    from runner.errors import describe

    assert describe(TypeError("unsupported operand")) is None
    assert describe(KeyError("x")) is None


def test_a_missing_torchvision_dataset_is_one_line_naming_where_the_files_go(tmp_path):
    from runner.data import DatasetUnavailable
    from runner.errors import dataset_missing_message, describe

    torchvision_text = ("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/mnist/, got:\n"
                        "<urlopen error [Errno -2] Name or service not known>\n")
    reason = f"download failed: RuntimeError: {torchvision_text}"
    err = DatasetUnavailable(dataset_missing_message("mnist", tmp_path, reason))
    line = describe(err)
    assert "\n" not in line and "urlopen" not in line and "no network" in line
    assert f"{tmp_path}/MNIST/raw/" in line and "dataset.data_dir" in line


def test_plus_method_over_a_preset_says_what_to_type(compose_cfg):
    from hydra.errors import HydraException

    from runner.errors import describe

    with pytest.raises(HydraException) as info:
        compose_cfg("experiment=cifar10_at", "+method=trades")
    line = describe(info.value)
    assert "method=trades" in line and "without the '+'" in line and "override method" not in line


def test_a_damaged_last_checkpoint_hints_resume_never_without_torchs_advice():
    from runner.checkpoint import CheckpointError
    from runner.errors import describe

    err = CheckpointError("'/r/checkpoints/last.pt' is not a readable robust-train checkpoint (truncated or not a "
                          "checkpoint): UnpicklingError: Weights only load failed. In PyTorch 2.6, we changed the "
                          "default value of the `weights_only` argument. Re-running `torch.load` with `weights_only` "
                          "set to `False` will likely succeed")
    line = describe(err, "robust-train")
    assert "weights_only" not in line and "resume=never" in line
    assert "resume=never" not in describe(err, "robust-eval")
