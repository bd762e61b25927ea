"""dataset.val_size=0: the whole training set is trained on (as the TRADES and SAM references do), with
no per-epoch validation and no best.pt; only runs that evaluate their final model may do without."""

import json

import pytest

from runner.data import load_splits
from runner.errors import ConfigError
from runner.train import run


def test_a_run_without_validation_trains_on_everything_and_evaluates_the_final_model(compose_cfg, tmp_path):
    cfg = compose_cfg("+method=trades", "method.attack.steps=1", "dataset.val_size=0", "train.epochs=2",
                      "eval.n_examples=50", "eval.evaluators=[{name:clean}]", "train.progress=plain")
    splits = load_splits(cfg.dataset, cfg.seed)
    assert len(splits.val[1]) == 0 and len(splits.train[1]) + len(splits.test[1]) == 1797  # all of digits
    results = run(cfg, tmp_path)
    assert results["train"]["checkpoint"] == "last" and results["train"]["checkpoint_epoch"] == 2
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("val/") for record in records for key in record)
    assert "0 val" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("overrides", [["+method=at"], ["+method=ibp"], ["eval.checkpoint=best"]])
def test_runs_that_evaluate_best_pt_need_a_validation_split(compose_cfg, tmp_path, overrides):
    with pytest.raises(ConfigError, match="dataset.val_size.*eval.checkpoint=last"):
        run(compose_cfg("dataset.val_size=0", *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_best_pt_methods_may_skip_validation_when_told_to_evaluate_the_final_model(compose_cfg, tmp_path):
    results = run(compose_cfg("+method=at", "method.attack.steps=1", "dataset.val_size=0", "eval.checkpoint=last",
                              "train.epochs=1", "eval=none", "train.progress=plain"), tmp_path)
    assert results["train"]["checkpoint"] == "last"
