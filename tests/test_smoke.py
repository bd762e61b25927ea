"""CPU smoke runs through Hydra's compose API: run directory, results.json, exact resume, re-evaluation."""

import json

import pytest
import torch

from runner import checkpoint, load_dataset, load_model
from runner.reevaluate import reevaluate
from runner.train import run

FAST = ("train.epochs=2", "train.progress=plain", "train.log_every=5", "eval.n_examples=100")

RESULT_KEYS = {"run", "train", "metrics", "eval", "checks", "env"}


@pytest.mark.parametrize("method", [None, "at"])
def test_smoke_run_writes_the_contract(compose_cfg, tmp_path, method):
    overrides = FAST + ((f"+method={method}", "method.attack.steps=2") if method else ())
    results = run(compose_cfg(*overrides), tmp_path)
    assert RESULT_KEYS <= set(results)
    assert results["run"]["method"] == (method or "erm")
    assert results["run"]["threat"] == {"norm": "linf", "eps": 0.1, "eps_255": 25.5}
    assert results["train"]["epochs"] == 2 and results["train"]["steps"] > 0
    metrics = results["metrics"]
    assert 0 <= metrics["pgd/acc"] <= metrics["clean/acc"] <= 1
    assert results["eval"]["pgd/acc"]["steps"] == 50 and results["eval"]["pgd/acc"]["n_examples"] == 100
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == metrics
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["kind"] == "epoch" for row in lines) == 2
    assert (tmp_path / "train.log").read_text().count("epoch") >= 2
    for name in ("best.pt", "last.pt"):
        assert checkpoint.load(tmp_path / "checkpoints" / name)["model"]
    # eval.checkpoint=auto: ERM reports its final model, AT its best validation epoch; the report says which
    evaluated = results["train"]["checkpoint"]
    assert evaluated == ("best" if method == "at" else "last")
    saved_epoch = checkpoint.load(tmp_path / "checkpoints" / f"{evaluated}.pt").get("epoch")
    assert results["train"]["checkpoint_epoch"] == (saved_epoch if method == "at" else 2)
    assert f"- model: {evaluated}.pt" in (tmp_path / "report.md").read_text()


def test_erm_learns_digits(compose_cfg, tmp_path):
    results = run(compose_cfg("train.epochs=8", "eval=none", "train.progress=plain"), tmp_path)
    assert results["metrics"] == {}
    model = load_model(tmp_path)
    x, y = load_dataset("digits")
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


def weights(path):
    return checkpoint.load(path)["model"]


def test_resume_is_exact(compose_cfg, tmp_path):
    """2 epochs, then resume to 4, equals 4 straight epochs (constant lr: the schedule spans the run)."""
    common = ("+method=at", "method.attack.steps=2", "scheduler=constant", "eval=none",
              "train.progress=plain")
    run(compose_cfg(*common, "train.epochs=4"), tmp_path / "straight")
    run(compose_cfg(*common, "train.epochs=2"), tmp_path / "resumed")
    run(compose_cfg(*common, "train.epochs=4"), tmp_path / "resumed")
    a = weights(tmp_path / "straight/checkpoints/last.pt")
    b = weights(tmp_path / "resumed/checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert "resumed at epoch 2" in log


def test_robust_eval_reproduces_the_run(compose_cfg, tmp_path):
    results = run(compose_cfg(*FAST), tmp_path / "run")
    cfg = compose_cfg(f"ckpt={tmp_path / 'run'}", "eval.n_examples=100", config_name="eval")
    again = reevaluate(cfg, [f"ckpt={tmp_path / 'run'}", "eval.n_examples=100"], tmp_path / "eval")
    assert again["metrics"] == results["metrics"]
    assert again["run"] == results["run"]


def test_load_dataset_test_split_is_fixed():
    x, y = load_dataset("digits")
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    x2, y2 = load_dataset("digits")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y).min() >= 30  # stratified
