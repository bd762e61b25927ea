"""The catastrophic-overfitting guard (train.collapse_drop): it stops on a fall of the method's metric on
the epoch's first training batch, keeps the collapsed model out of best.pt, records itself in
results.json, and a stopped run stays stopped when its command runs again."""

import json

import pytest
import torch

from runner.collapse import CollapseGuard
from runner.distributed import Processes
from runner.errors import ConfigError
from runner.methods.at import AT
from runner.train import run


class ScriptedMethod:
    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def validate(self, model, x, y, ctx):
        self.seen.append((x.clone(), y.clone(), model.training))
        return {"val/score": self.scores.pop(0)}


def test_guard_stops_on_a_fall_larger_than_drop_and_compares_with_the_last_good_epoch():
    guard, model, proc = CollapseGuard(0.2), torch.nn.Linear(2, 2), Processes()
    method = ScriptedMethod([0.50, 0.45, 0.31, 0.29])
    verdicts = []
    for epoch in range(4):
        x = torch.full((3, 2), float(epoch))
        guard.remember(x, torch.zeros(3, dtype=torch.long))
        x.add_(100)  # the loader reusing its buffer must not change what the guard measures
        guard.remember(torch.ones(3, 2), torch.ones(3, dtype=torch.long))  # later batches are ignored
        verdicts.append(guard.collapsed(method, model, None, epoch, proc))
    # 0.50 -> 0.45 -> 0.31: falls of 0.05 and 0.14, no collapse; 0.31 -> 0.29 neither.
    assert verdicts == [False, False, False, False]
    assert [float(x[0, 0]) for x, _, _ in method.seen] == [0, 1, 2, 3]  # each epoch's first batch, copied
    assert not any(training for _, _, training in method.seen)  # measured in eval mode
    assert model.training  # and the model handed back as it was

    guard, method = CollapseGuard(0.2), ScriptedMethod([0.50, 0.29, 0.60])
    results = []
    for epoch in range(3):
        guard.remember(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
        results.append(guard.collapsed(method, model, None, epoch, proc))
    assert results == [False, True, False]  # 0.50 -> 0.29 falls 0.21
    assert guard.collapse == {"epoch": 2, "score": 0.29, "previous": 0.50}
    restored = CollapseGuard(0.2)
    restored.load_state_dict(guard.state_dict())
    assert restored.summary() == guard.summary()


def test_a_disabled_guard_measures_nothing():
    guard, method = CollapseGuard(None), ScriptedMethod([])
    guard.remember(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert not guard.collapsed(method, torch.nn.Linear(2, 2), None, 0, Processes())
    assert method.seen == [] and guard.summary() is None


def _script_the_guard(monkeypatch, scores, batch_size):
    """AT's metric on the guard's batch (the only call with `batch_size` examples) follows `scores`;
    validation on the validation split is the real one."""
    real, scripted = AT.validate, list(scores)

    def validate(self, model, x, y, ctx):
        if len(y) == batch_size:
            return {"val/score": scripted.pop(0)}
        return real(self, model, x, y, ctx)

    monkeypatch.setattr(AT, "validate", validate)


def test_a_collapse_stops_training_keeps_best_pt_from_before_and_stays_stopped(compose_cfg, tmp_path, monkeypatch):
    common = ("+method=at", "method.attack.steps=2", "train.epochs=5", "train.batch_size=128",
              "train.collapse_drop=0.2", "eval.n_examples=60", "eval.evaluators=[{name:clean}]",
              "train.progress=plain")
    _script_the_guard(monkeypatch, [0.60, 0.70, 0.40, 0.90, 0.90], batch_size=128)
    results = run(compose_cfg(*common), tmp_path)
    train = results["train"]
    assert train["epochs"] == 5 and train["epochs_trained"] == 3
    assert train["steps"] == 3 * train["steps_per_epoch"]
    assert train["collapse_guard"]["collapse"] == {"epoch": 3, "score": 0.40, "previous": 0.70, "restored_epoch": 2}
    assert train["collapse_guard"]["scores"] == [0.6, 0.7, 0.4]
    assert train["checkpoint"] == "best" and train["checkpoint_epoch"] <= 2
    assert torch.load(tmp_path / "checkpoints/best.pt", weights_only=False)["epoch"] <= 2
    assert "catastrophic overfitting in epoch 3" in (tmp_path / "train.log").read_text()
    epochs_logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(e.get("epoch", 0) for e in epochs_logged) == 3

    # The same command again: nothing more is trained (the scripted scores would have gone on).
    again = run(compose_cfg(*common), tmp_path)
    assert again["train"]["steps"] == train["steps"] and again["train"]["epochs_trained"] == 3
    assert again["metrics"] == results["metrics"]


def test_after_a_collapse_the_final_model_is_the_last_good_epochs(compose_cfg, tmp_path, monkeypatch):
    """The reference's setup (all training images, the final model): last.pt holds epoch 2's weights."""
    _script_the_guard(monkeypatch, [0.60, 0.70, 0.40, 0.90], batch_size=128)
    results = run(compose_cfg("+method=at", "method.attack.steps=1", "train.epochs=4", "train.batch_size=128",
                              "train.collapse_drop=0.2", "dataset.val_size=0", "eval.checkpoint=last",
                              "eval.evaluators=[{name:clean}]", "eval.n_examples=60", "train.progress=plain"),
                  tmp_path)
    assert results["train"]["checkpoint"] == "last" and results["train"]["checkpoint_epoch"] == 2
    final = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)
    epoch_2 = torch.load(tmp_path / "checkpoints/last.prev.pt", weights_only=False)  # written after epoch 2
    assert final["epoch"] == 3 and epoch_2["epoch"] == 2
    for name, value in epoch_2["model"].items():
        assert torch.equal(final["model"][name], value), name  # BatchNorm statistics included
    assert "training stops here with epoch 2's model" in (tmp_path / "train.log").read_text()


def test_the_kept_model_survives_a_resume():
    guard, model, proc = CollapseGuard(0.2), torch.nn.Linear(2, 2), Processes()
    method = ScriptedMethod([0.50, 0.10])
    guard.remember(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert not guard.collapsed(method, model, None, 0, proc)
    good = model.weight.detach().clone()
    resumed = CollapseGuard(0.2)
    resumed.load_state_dict(guard.state_dict())  # what last.pt carries
    with torch.no_grad():
        model.weight.add_(1.0)  # epoch 2 trains on
    resumed.remember(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    assert resumed.collapsed(method, model, None, 1, proc)
    resumed.restore(model)
    assert torch.equal(model.weight, good) and resumed.collapse["restored_epoch"] == 1


def test_without_the_guard_all_epochs_train(compose_cfg, tmp_path, monkeypatch):
    _script_the_guard(monkeypatch, [], batch_size=128)  # any guard measurement would fail (empty script)
    results = run(compose_cfg("+method=at", "method.attack.steps=1", "train.epochs=3", "train.batch_size=128",
                              "eval=none", "train.progress=plain"), tmp_path)
    assert results["train"]["epochs_trained"] == 3 and results["train"]["collapse_guard"] is None


@pytest.mark.parametrize("value", [-0.1, 1.0, 2])
def test_collapse_drop_must_be_a_fraction(compose_cfg, tmp_path, value):
    with pytest.raises(ConfigError, match="train.collapse_drop"):
        run(compose_cfg(f"train.collapse_drop={value}"), tmp_path)
