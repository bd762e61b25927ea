"""bf16 autocast and channels-last are training-only speed settings: the run completes, its checkpoint
loads, and every evaluation attack runs in fp32 outside autocast, on an fp32 model."""

import json

import torch

import runner.evaluators.pgd as pgd_evaluator
from runner import load_model
from runner.config import compose
from runner.train import run


def test_bf16_channels_last_training_evaluates_in_fp32(tmp_path, monkeypatch):
    seen = []
    attack = pgd_evaluator.pgd

    def recording_pgd(model, x, *args, **kwargs):
        seen.append({
            "autocast": torch.is_autocast_enabled("cpu"),
            "params": {p.dtype for p in model.parameters()},
            "input": x.dtype,
            "logits": model(x[:2]).dtype,
        })
        return attack(model, x, *args, **kwargs)

    monkeypatch.setattr(pgd_evaluator, "pgd", recording_pgd)
    cfg = compose(["+method=at", "method.attack.steps=2", "train.epochs=1", "train.precision=bf16",
                   "train.channels_last=true", "model=cnn7", "eval.n_examples=64", "device=cpu"])
    results = run(cfg, tmp_path)

    assert seen, "the quick suite's PGD evaluator did not run"
    for call in seen:
        assert call == {"autocast": False, "params": {torch.float32}, "input": torch.float32,
                        "logits": torch.float32}
    assert 0.0 <= results["metrics"]["pgd/acc"] <= results["metrics"]["clean/acc"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["train"]["precision"] == "bf16"
    model = load_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_update_computes_the_loss_in_bf16_and_keeps_fp32_weights():
    from runner.data import dataset_info
    from runner.methods import build_method
    from runner.methods.base import StepContext
    from runner.models import build_model
    from runner.optim import build_optimizer
    from runner.update import build_update

    cfg = compose(["train.precision=bf16", "model=cnn7", "device=cpu"])
    model = build_model(cfg.model, dataset_info(cfg.dataset))
    dtypes = []
    model[-1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    logs = update(model.train(), build_method(cfg), x, y, StepContext(0, 0, 1, 1, "linf", 0.1))
    assert dtypes == [torch.bfloat16]  # the forward ran under autocast
    assert torch.isfinite(logs["loss"]) and logs["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_interval_bounds_train_under_bf16_autocast():
    """IBP's hand-written autograd nodes step aside under autocast: the bounds' backward works in bf16
    and every parameter gets a finite fp32 gradient."""
    from torch import nn

    from runner import bounds

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lower = bounds.ibp_margin_bounds(net, x, y, 0.1)
    bounds.robust_cross_entropy(lower.float(), y).backward()
    for p in net.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
