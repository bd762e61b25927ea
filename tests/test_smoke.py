"""CPU smoke runs through Hydra's compose API: run directory, results.json, exact resume, re-evaluation."""

import copy
import json

import pytest
import torch

from runner import checkpoint, load_dataset, load_model
from runner.data import load_splits, to_float
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
    # The reported clean accuracy is that checkpoint's model's, recomputed here on the same 100 test points.
    x, y = load_dataset("digits")
    assert metrics["clean/acc"] == accuracy(load_model(tmp_path / "checkpoints" / f"{evaluated}.pt"), x[:100], y[:100])


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_evaluation_of_best_loads_best_pt_not_the_final_model(compose_cfg, tmp_path, monkeypatch):
    """A validation score that peaks at epoch 1 of 2 (the method's validate, patched) makes best.pt the
    epoch-1 model: eval.checkpoint=best must evaluate those weights, not the final ones still in memory."""
    import runner.train

    build_method, evaluate = runner.train.build_method, runner.train.evaluate
    evaluated = {}

    def method_peaking_at_epoch_1(cfg):
        method = build_method(cfg)
        validate, calls = method.validate, []

        def validate_peaking(*args):
            calls.append(1)
            return {**validate(*args), "val/score": 1.0 / len(calls)}

        method.validate = validate_peaking
        return method

    def recording_evaluate(model, *args, **kwargs):
        evaluated.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(runner.train, "build_method", method_peaking_at_epoch_1)
    monkeypatch.setattr(runner.train, "evaluate", recording_evaluate)
    results = run(compose_cfg("train.epochs=2", "train.progress=plain", "eval.checkpoint=best",
                              "eval.evaluators=[{name:clean}]", "eval.n_examples=null"), tmp_path)
    best, last = (checkpoint.load(tmp_path / "checkpoints" / f"{name}.pt") for name in ("best", "last"))
    assert best["epoch"] == 1 == results["train"]["checkpoint_epoch"] and last["epoch"] == 2
    assert evaluated.keys() == best["model"].keys()
    assert all(torch.equal(evaluated[k], best["model"][k]) for k in evaluated)
    x, y = load_dataset("digits")
    best_acc = accuracy(load_model(tmp_path / "checkpoints" / "best.pt"), x, y)
    last_acc = accuracy(load_model(tmp_path / "checkpoints" / "last.pt"), x, y)
    assert best_acc != last_acc  # the construction: one epoch of training against two
    assert results["metrics"]["clean/acc"] == best_acc


def test_erm_learns_digits(compose_cfg, tmp_path):
    results = run(compose_cfg("train.epochs=8", "eval=none", "train.progress=plain"), tmp_path)
    assert results["metrics"] == {}
    model = load_model(tmp_path)
    x, y = load_dataset("digits")
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


def weights(path):
    return checkpoint.load(path)["model"]


def test_resume_is_exact(compose_cfg, tmp_path, monkeypatch):
    """2 epochs, then resume to 4, equals 4 straight epochs (constant lr: the schedule spans the run), and
    the resumed run trains epochs 3 and 4 only, starting from the checkpoint's model and optimizer (a run
    that ignored the checkpoint and trained 4 epochs from scratch would end with the same weights)."""
    import runner.train

    common = ("+method=at", "method.attack.steps=2", "scheduler=constant", "eval=none",
              "train.progress=plain", "train.log_every=1")
    run(compose_cfg(*common, "train.epochs=4"), tmp_path / "straight")
    run(compose_cfg(*common, "train.epochs=2"), tmp_path / "resumed")
    saved = checkpoint.load(tmp_path / "resumed/checkpoints/last.pt")
    steps_per_epoch = saved["step"] // 2
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    first_run_rows = len(metrics.read_text().splitlines())

    seen = {"steps": []}
    build_optimizer, build_method = runner.train.build_optimizer, runner.train.build_method

    def recording_optimizer(cfg, model):
        seen["optimizer"] = build_optimizer(cfg, model)
        return seen["optimizer"]

    def recording_method(cfg):
        method = build_method(cfg)
        loss = method.loss

        def recording_loss(model, x, y, ctx):
            if not seen["steps"]:  # the first step after resuming, before it changes anything
                seen["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                seen["optimizer_state"] = copy.deepcopy(seen["optimizer"].state_dict()["state"])
            seen["steps"].append(ctx.step)
            return loss(model, x, y, ctx)

        method.loss = recording_loss
        return method

    monkeypatch.setattr(runner.train, "build_optimizer", recording_optimizer)
    monkeypatch.setattr(runner.train, "build_method", recording_method)
    run(compose_cfg(*common, "train.epochs=4"), tmp_path / "resumed")

    a = weights(tmp_path / "straight/checkpoints/last.pt")
    b = weights(tmp_path / "resumed/checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert f"resumed after epoch 2 (step {saved['step']})" in log
    # The second process trained the steps after the checkpoint's, each once: total - checkpointed.
    assert seen["steps"] == list(range(saved["step"], 4 * steps_per_epoch))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[first_run_rows:]]
    logged = [row["step"] for row in rows if row["kind"] == "train"]
    assert logged == list(range(saved["step"] + 1, 4 * steps_per_epoch + 1))
    assert [row["epoch"] for row in rows if row["kind"] == "epoch"] == [3, 4]
    # ... starting from exactly the checkpoint's weights and momentum.
    assert seen["model"].keys() == saved["model"].keys()
    assert all(torch.equal(seen["model"][k], saved["model"][k]) for k in saved["model"])
    momentum = {k: v["momentum_buffer"] for k, v in saved["optimizer"]["state"].items()}
    assert {k: v["momentum_buffer"] for k, v in seen["optimizer_state"].items()}.keys() == momentum.keys()
    assert all(torch.equal(seen["optimizer_state"][k]["momentum_buffer"], v) for k, v in momentum.items())


def test_robust_eval_reproduces_the_run(compose_cfg, tmp_path):
    results = run(compose_cfg(*FAST), tmp_path / "run")
    cfg = compose_cfg(f"ckpt={tmp_path / 'run'}", "eval.n_examples=100", config_name="eval")
    again = reevaluate(cfg, [f"ckpt={tmp_path / 'run'}", "eval.n_examples=100"], tmp_path / "eval")
    assert again["metrics"] == results["metrics"]
    assert again["run"] == results["run"]


def test_load_dataset_test_split_is_fixed(compose_cfg):
    """The test split does not depend on the training seed (nor on label noise, which the seed drives):
    load_dataset's split is the one every run is evaluated on, whatever its seed."""
    x, y = load_dataset("digits")
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y).min() >= 30  # stratified
    for seed in (0, 1, 12345):
        for noise in ("0", "0.3"):
            splits = load_splits(compose_cfg(f"seed={seed}", f"dataset.label_noise={noise}").dataset, seed)
            x_run, y_run = splits.test
            assert torch.equal(to_float(x_run), x) and torch.equal(y_run, y), (seed, noise)
