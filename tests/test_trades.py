import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from runner.config import AttackConfig
from runner.methods import trades
from runner.methods.base import StepContext

EPS, STEP, STEPS, BETA = 0.1, 0.02, 5, 6.0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g) * 0.6 + 0.2  # away from 0 and 1: no clamping at the start
    return x, torch.randint(0, 5, (n,), generator=g)


def method(beta=BETA, **attack):
    attack = {"steps": STEPS, "alpha": STEP} | attack
    cfg = OmegaConf.create({"method": OmegaConf.structured(trades.Config(beta=beta, attack=AttackConfig(**attack)))})
    return trades.build(cfg)


CTX = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="linf", eps=EPS)


def reference_attack(model, x):
    """The TRADES attack written out directly: eval mode, x + 0.001·N(0, I), sign ascent on the summed KL,
    projection to the eps-box and [0, 1] after each step, last iterate."""
    model.eval()
    with torch.no_grad():
        clean_probs = F.softmax(model(x), dim=1)
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean_probs, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    model.train()
    return x_adv


def test_attack_matches_the_reference_loop():
    model, (x, y) = tiny_model(), batch()
    model.train()
    torch.manual_seed(5)
    ours = method().adversarial(model, x, y, CTX)
    torch.manual_seed(5)
    theirs = reference_attack(model, x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - x).abs().max() <= EPS + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    assert (ours - x).abs().max() > 0.5 * EPS  # it really moved


def test_attack_runs_in_eval_mode_and_leaves_train_mode():
    model, (x, y) = tiny_model(), batch()
    modes = []
    model[1].register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    model.train()
    method().adversarial(model, x, y, CTX)
    assert modes and not any(modes)
    assert model.training
    modes.clear()
    method(bn_mode="train").adversarial(model, x, y, CTX)
    assert modes and all(modes)


def test_loss_matches_the_formula_with_the_clean_softmax_not_detached(monkeypatch):
    model, (x, y) = tiny_model(), batch()
    model.train()
    x_adv = (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)
    m = method()
    monkeypatch.setattr(m, "adversarial", lambda *args, **kwargs: x_adv)

    loss, logs = m.loss(model, x, y, CTX)
    model.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]

    def formula(detach_clean):
        clean = model(x)
        target = F.softmax(clean, dim=1)
        target = target.detach() if detach_clean else target
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="batchmean")
        return F.cross_entropy(clean, y) + BETA * kl

    model.zero_grad()
    expected = formula(detach_clean=False)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))
    assert torch.allclose(logs["loss_natural"] + BETA * logs["loss_robust"], loss.detach(), atol=1e-6)

    model.zero_grad()
    formula(detach_clean=True).backward()
    assert not all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))


def test_beta_zero_is_clean_cross_entropy():
    model, (x, y) = tiny_model(), batch()
    model.train()
    loss, _ = method(beta=0.0).loss(model, x, y, CTX)
    assert torch.allclose(loss, F.cross_entropy(model(x), y), atol=1e-6)


def test_l2_threat_stays_in_the_ball():
    model, (x, y) = tiny_model(), batch()
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="l2", eps=0.5)
    x_adv = method(alpha=0.2).adversarial(model, x, y, ctx)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


@pytest.mark.parametrize("bad, key", [({"beta": -1.0}, "method.beta"), ({"random_start": False}, "random_start")])
def test_bad_config_names_the_key(bad, key):
    beta = bad.pop("beta", BETA)
    with pytest.raises(ValueError, match=key):
        method(beta=beta, **bad)


def test_keys_and_presets_compose():
    from hydra import compose, initialize_config_module

    from runner.config import register_configs

    register_configs()
    with initialize_config_module("runner.configs", version_base=None):
        cfg = compose("train", overrides=["+method=trades", "method.beta=2", "method.attack.steps=3"])
        assert cfg.method.beta == 2 and cfg.method.attack.steps == 3 and trades.build(cfg).select_on == "pgd"
        cifar = compose("train", overrides=["experiment=cifar10_trades"])
        assert (cifar.model.name, cifar.threat.eps, cifar.method.beta) == ("wrn_34_10", 8 / 255, 6.0)
        # Trains at the reference's 0.031, evaluates at 8/255 (where the published AutoAttack number is).
        assert cifar.method.attack.eps_factor * cifar.threat.eps == pytest.approx(0.031, abs=1e-12)
        assert (cifar.method.attack.steps, cifar.method.attack.alpha, cifar.train.epochs) == (10, 0.007, 76)
        mnist = compose("train", overrides=["experiment=mnist_trades"])
        assert (mnist.threat.eps, mnist.method.beta, mnist.method.attack.steps) == (0.3, 1.0, 40)
        assert (mnist.method.attack.alpha, mnist.optimizer.lr, mnist.train.epochs) == (0.01, 0.01, 100)


def test_cpu_smoke_run(compose_cfg, tmp_path):
    import json

    from runner.train import run

    cfg = compose_cfg(
        "+method=trades",
        "method.attack.steps=2",
        "train.epochs=2",
        "train.log_every=5",
        "train.progress=plain",
        "eval.n_examples=100",
    )
    results = run(cfg, tmp_path)
    assert results["run"]["method"] == "trades"
    assert 0 <= results["metrics"]["pgd/acc"] <= results["metrics"]["clean/acc"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_robust" in row for row in rows) and any("val/pgd_acc" in row for row in rows)
