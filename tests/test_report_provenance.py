"""report.md and results.json say which model the numbers are of: the training seed, recipe, epochs,
checkpoint and software in the report's header; robust-eval keeps the training threat in `run` and
records the evaluation's separately; L2 eps is never shown in /255 units."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import runner.cli  # noqa: F401 - registers the resolvers the eval config uses
import runner.report_header as report_module
from runner import checkpoint
from runner.config import compose
from runner.data import dataset_info, load_dataset
from runner.evaluate import evaluate
from runner.models import build_model
from runner.reevaluate import reevaluate
from runner.train import model_checkpoint, run_summary

QUICK = "eval.evaluators=[{name: clean}, {name: pgd, steps: 2}]"


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, dataset_info(cfg.dataset)).eval()


@pytest.fixture(scope="module")
def at_run(tmp_path_factory) -> Path:
    """A run directory as robust-train leaves it: AT trained at eps 0.1 with seed 1, best.pt at epoch 2,
    its results.json describing that checkpoint."""
    run_dir = tmp_path_factory.mktemp("at_run")
    cfg = compose(["+method=at", "model=mlp", "model.hidden=[16]", "seed=1", "train.epochs=3"])
    config = OmegaConf.to_container(cfg, resolve=True)
    model = _model(cfg)
    checkpoint.save(model_checkpoint(cfg, model, {"epoch": 2}, config), run_dir / "checkpoints" / "best.pt")
    results = {
        "run": run_summary(cfg),
        "train": {"epochs": 3, "epochs_trained": 3, "wall_time_s": 12.5, "steps": 63, "checkpoint": "best",
                  "checkpoint_epoch": 2},
        "env": {"torch": "9.9.9-train", "git": "abcdef1234567890", "versions": {"robust-train": "0.0.7"}},
        "config": config,
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_report_header_names_training_seed_recipe_epochs_checkpoint_and_software(tmp_path):
    cfg = compose(["+method=at", "model=mlp", "model.hidden=[16]", "seed=1", "eval.n_examples=20", QUICK])
    x, y = load_dataset("digits", "test")
    out = evaluate(_model(cfg), cfg, x, y, torch.device("cpu"), tmp_path, "best.pt, epoch 2: the best score")
    results = {
        "run": run_summary(cfg), **out,
        "train": {"epochs": 5, "epochs_trained": 4, "steps": 84, "wall_time_s": 3.0, "checkpoint": "best",
                  "checkpoint_epoch": 2},
        "env": {"torch": "2.99.0", "python": "3.11.7", "device": "cpu", "git": "0123456789abcdef",
                "versions": {"robust-train": "4.5.6"}},
    }
    header = "\n".join(report_module.header_lines(cfg, results, "best.pt, epoch 2"))
    assert "training seed 1" in header
    assert "PGD-10 at 1.2 x eps = 0.12" in header  # the digits recipe: AT at 1.2 x eps
    assert "4 of 5 epochs trained" in header and "best.pt (epoch 2)" in header
    assert "robust-train 4.5.6" in header and "git 0123456789" in header and "torch 2.99.0" in header
    # The report evaluate() writes by itself already knows the training seed, checkpoint epoch and versions.
    report = (tmp_path / "report.md").read_text()
    head = report.split("## Metrics")[0]
    assert "training seed 1" in head and "(epoch 2)" in head and f"torch {torch.__version__}" in head
    assert "robust-train " in head
    # The per-row seed is the evaluation's, and says so.
    assert "eval seed" in report and "| seed |" not in report


def test_l2_eps_is_not_shown_in_255_units(tmp_path):
    assert report_module.threat_summary("l2", 0.5) == {"norm": "l2", "eps": 0.5, "eps_255": None}
    assert report_module.threat_summary("linf", 0.1)["eps_255"] == 25.5
    assert "/255" not in report_module.eps_text("l2", 0.5) and "25.5/255" in report_module.eps_text("linf", 0.1)
    cfg = compose(["model=mlp", "model.hidden=[16]", "threat.norm=l2", "threat.eps=0.5", "eval.n_examples=20",
                   QUICK])
    x, y = load_dataset("digits", "test")
    out = evaluate(_model(cfg), cfg, x, y, torch.device("cpu"), tmp_path)
    assert out["eval"]["pgd/acc"]["norm"] == "l2" and out["eval"]["pgd/acc"]["eps_255"] is None
    report = (tmp_path / "report.md").read_text()
    assert "/255" not in report and "127.5" not in report


def test_every_metric_records_its_interval_method(tmp_path):
    cfg = compose(["model=mlp", "model.hidden=[16]", "eval.n_examples=20",
                   "eval.evaluators=[{name: clean}, {name: calibration, steps: 1, bootstrap: 5}]"])
    x, y = load_dataset("digits", "test")
    out = evaluate(_model(cfg), cfg, x, y, torch.device("cpu"), tmp_path)
    for key, settings in out["eval"].items():
        assert "ci95_method" in settings, key
    assert "Wilson" in out["eval"]["clean/acc"]["ci95_method"]
    assert "bootstrap" in out["eval"]["calibration/ece"]["ci95_method"]
    report = (tmp_path / "report.md").read_text()
    assert report.count("Wilson score interval") >= 1 and "bootstrap over examples" in report


def test_robust_eval_keeps_the_training_threat_and_records_the_evaluation_threat(at_run, tmp_path):
    overrides = [f"ckpt={at_run}", "threat.eps=0.2", "eval.n_examples=20", QUICK, "device=cpu"]
    results = reevaluate(compose(overrides, config_name="eval"), overrides, tmp_path / "eval")
    assert results["run"]["threat"] == {"norm": "linf", "eps": 0.1, "eps_255": 25.5}
    assert results["run"]["seed"] == 1 and results["run"]["method"] == "at"
    assert results["eval_threat"] == {"norm": "linf", "eps": 0.2, "eps_255": 51.0}
    assert results["eval"]["pgd/acc"]["eps"] == 0.2
    assert results["train_config"]["threat"]["eps"] == 0.1
    # The training block: what the checkpoint and its run's results.json know.
    train = results["train"]
    assert train["checkpoint"] == "best" and train["checkpoint_epoch"] == 2 and train["epochs"] == 3
    assert train["wall_time_s"] == 12.5 and train["steps"] == 63 and train["epochs_trained"] == 3
    assert results["train_env"]["torch"] == "9.9.9-train"
    # This evaluation's own environment, as robust-train records it.
    env = results["env"]
    assert env["torch"] == torch.__version__ and "robust-train" in env["versions"] and env["command"]
    assert env["seed"] == 1 and env["eval_seed"] == 0
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["run"]["threat"]["eps"] == 0.1 and on_disk["eval_threat"]["eps"] == 0.2
    head = (tmp_path / "eval" / "report.md").read_text().split("## Metrics")[0]
    assert "training seed 1" in head and "threat linf eps=0.1" in head
    assert re.search(r"evaluation threat: linf eps=0.2 .*differs from the training threat", head)
    assert "torch 9.9.9-train" in head  # the training software, from the run's results.json


def test_robust_eval_on_a_bare_checkpoint_says_null_for_what_it_cannot_know(tmp_path):
    cfg = compose(["model=mlp", "model.hidden=[16]"])
    path = tmp_path / "bare.pt"
    checkpoint.save(model_checkpoint(cfg, _model(cfg), {"epoch": 4}), path)
    overrides = [f"ckpt={path}", "eval.n_examples=20", QUICK, "device=cpu"]
    results = reevaluate(compose(overrides, config_name="eval"), overrides, tmp_path / "eval")
    train = results["train"]
    assert train["checkpoint_epoch"] == 4 and train["wall_time_s"] is None and train["steps"] is None
    assert "wall_time_s" in train and "steps" in train and results["train_env"] is None
    assert results["run"]["threat"] == results["eval_threat"]
