"""Train / validation / test: fixed membership whatever the training seed, disjoint, and used for what
they are for (best.pt is selected on validation, never on test; the test split is only evaluated)."""

import json

import numpy as np
import pytest
import torch

from runner import checkpoint, load_dataset, load_model
from runner.config import compose
from runner.data import load_splits, to_float


def rows(x: torch.Tensor) -> list[bytes]:
    """Each image as bytes, to compare splits by content."""
    return [image.numpy().tobytes() for image in to_float(x).contiguous()]


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_validation_and_test_splits_do_not_depend_on_the_training_seed(compose_cfg, dataset):
    reference = load_splits(compose_cfg(f"dataset={dataset}").dataset, seed=0)
    for seed in (1, 7, 12345):
        splits = load_splits(compose_cfg(f"dataset={dataset}", f"seed={seed}").dataset, seed=seed)
        for name in ("train", "val", "test"):  # membership and order fixed; no noise: labels too
            for a, b in zip(getattr(splits, name), getattr(reference, name)):
                assert torch.equal(a, b), (seed, name)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_validation_and_test_never_overlap_with_training_images(compose_cfg, dataset):
    cfg = compose_cfg(f"dataset={dataset}").dataset
    splits = load_splits(cfg, seed=0)
    train, val, test = (rows(getattr(splits, name)[0]) for name in ("train", "val", "test"))
    assert (len(val), len(test)) == (cfg.val_size, cfg.test_size)
    assert len(set(train + val + test)) == len(train) + len(val) + len(test)  # no image in two splits
    assert set(val).isdisjoint(train) and set(test).isdisjoint(train) and set(val).isdisjoint(test)


def test_digits_splits_partition_the_dataset():
    """Every one of the 1,797 digits images lies in exactly one split, with its own label."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = sorted(zip(rows(torch.from_numpy((bunch.images / 16.0).astype(np.float32)[:, None])),
                      bunch.target.tolist()))
    parts = load_splits(compose(["dataset=digits"]).dataset, seed=0)
    labelled = sorted(
        pair for x, y in (parts.train, parts.val, parts.test) for pair in zip(rows(x), y.tolist())
    )
    assert labelled == full


def test_the_run_evaluates_the_same_test_split_whatever_its_seed(compose_cfg, tmp_path, monkeypatch):
    import runner.train

    evaluate, seen = runner.train.evaluate, []

    def recording_evaluate(model, cfg, x, y, *args, **kwargs):
        seen.append((x.clone(), y.clone()))
        return evaluate(model, cfg, x, y, *args, **kwargs)

    monkeypatch.setattr(runner.train, "evaluate", recording_evaluate)
    tiny = ("model=mlp", "model.hidden=[16]", "train.epochs=1", "train.batch_size=256", "eval=none",
            "train.progress=plain")
    for seed in (0, 3):
        runner.train.run(compose_cfg(*tiny, f"seed={seed}", "dataset.label_noise=0.2"), tmp_path / str(seed))
    x, y = load_dataset("digits")
    for x_run, y_run in seen:
        assert torch.equal(x_run, x) and torch.equal(y_run, y)


def test_best_pt_is_selected_on_the_validation_split_never_the_test_split(compose_cfg, tmp_path, monkeypatch):
    import runner.train

    build_method, validated = runner.train.build_method, []

    def recording_method(cfg):
        method = build_method(cfg)
        validate = method.validate

        def recording_validate(model, x, y, ctx):
            validated.append((x.clone(), y.clone()))
            return validate(model, x, y, ctx)

        method.validate = recording_validate
        return method

    monkeypatch.setattr(runner.train, "build_method", recording_method)
    cfg = compose_cfg("train.epochs=3", "eval=none", "train.progress=plain")
    runner.train.run(cfg, tmp_path)

    # Every validation (one per epoch) saw exactly the validation split.
    splits = load_splits(cfg.dataset, cfg.seed)
    x_val, y_val = to_float(splits.val[0]), splits.val[1]
    assert len(validated) == 3
    for x, y in validated:
        assert torch.equal(x, x_val) and torch.equal(y, y_val)

    # best.pt is the epoch with the best validation score (the earliest on a tie), and the validation
    # accuracy it stores is its model's, recomputed on the validation split.
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in epochs if row["kind"] == "epoch"]
    keys = [(row["val/score"], row["val/clean_acc"]) for row in epochs]
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == epochs[keys.index(max(keys))]["epoch"]
    model = load_model(tmp_path / "checkpoints" / "best.pt")
    with torch.no_grad():
        val_acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert best["val"]["val/clean_acc"] == pytest.approx(val_acc, abs=1e-9)
    assert best["val"]["val/score"] == best["val"]["val/clean_acc"]  # ERM selects on clean accuracy


def test_without_a_finite_validation_score_the_final_model_is_evaluated_and_labelled_so(compose_cfg, tmp_path,
                                                                                         monkeypatch):
    import runner.train

    build_method = runner.train.build_method

    def unscored_method(cfg):
        method = build_method(cfg)
        method.validate = lambda *args: {"val/score": float("nan"), "val/clean_acc": float("nan")}
        return method

    monkeypatch.setattr(runner.train, "build_method", unscored_method)
    cfg = compose_cfg("train.epochs=2", "eval.checkpoint=best", "eval.evaluators=[{name: clean}]", "model=mlp")
    results = runner.train.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert (results["train"]["checkpoint"], results["train"]["checkpoint_epoch"]) == ("last", 2)
    assert "no best.pt was written" in (tmp_path / "train.log").read_text()
