"""method.sam_attack: SAM around an attacking method either solves the attack again at w + e (rerun, the
default) or reuses the first pass's adversarial batch (reuse, AWP-style); checked against a hand-written
SAM step on the reused batch."""

import pytest
import torch
from torch import nn

import runner.methods.at as at_module
import runner.methods.trades as trades_module
from runner.errors import ConfigError
from runner.methods import build_method
from runner.methods.base import StepContext
from runner.optim import build_optimizer
from runner.train import run
from runner.update import build_update

RHO, LR = 0.2, 0.1


def _step(compose_cfg, monkeypatch, module, *overrides):
    """One SAM step of a tiny model; returns (model before, model after, the attacks' outputs)."""
    cfg = compose_cfg(*overrides, "method.sam=true", f"method.rho={RHO}", "optimizer=sgd", f"optimizer.lr={LR}",
                      "optimizer.momentum=0", "optimizer.weight_decay=0", "method.attack.steps=3")
    attacks, real = [], module.pgd

    def counted(*args, **kwargs):
        attacks.append(real(*args, **kwargs))
        return attacks[-1]

    monkeypatch.setattr(module, "pgd", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    update(model, build_method(cfg), x, y, StepContext(0, 0, 1, 1, "linf", 0.1))
    return before, model, attacks, (x, y)


def test_reuse_attacks_once_and_steps_with_the_gradient_at_w_plus_e_on_that_batch(compose_cfg, monkeypatch):
    before, model, attacks, (x, y) = _step(compose_cfg, monkeypatch, at_module, "+method=at",
                                           "method.sam_attack=reuse")
    assert len(attacks) == 1
    x_adv = attacks[0]
    # SAM by hand on the reused batch: g at w, e = rho g / |g|, g' at w + e, w <- w - lr g'.
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with torch.no_grad():
        for p, w in zip(reference.parameters(), before):
            p.copy_(w)
    params = list(reference.parameters())
    g = torch.autograd.grad(nn.functional.cross_entropy(reference(x_adv), y), params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(t * RHO / (norm + 1e-12))
    g_perturbed = torch.autograd.grad(nn.functional.cross_entropy(reference(x_adv), y), params)
    for p, w, t in zip(model.parameters(), before, g_perturbed):
        torch.testing.assert_close(p.detach(), w - LR * t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module, method", [(at_module, "at"), (trades_module, "trades")])
def test_rerun_attacks_on_both_passes_and_reuse_on_the_first_only(compose_cfg, monkeypatch, module, method):
    _, _, rerun, _ = _step(compose_cfg, monkeypatch, module, f"+method={method}")
    assert len(rerun) == 2 and not torch.equal(rerun[0], rerun[1])  # the second attack is at w + e
    _, _, reuse, _ = _step(compose_cfg, monkeypatch, module, f"+method={method}", "method.sam_attack=reuse")
    assert len(reuse) == 1


def test_a_different_batch_is_never_served_the_cached_attack(compose_cfg):
    cfg = compose_cfg("+method=at", "method.attack.steps=1")
    method, eps = build_method(cfg), cfg.method.attack.eps_factor * 0.1
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    ctx = StepContext(0, 0, 1, 1, "linf", 0.1, reuse_attack=True)
    first, other = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    cached = method.adversarial(model, first, y, ctx)
    assert method.adversarial(model, first, y, ctx) is cached
    assert (method.adversarial(model, other, y, ctx) - other).abs().max() <= eps + 1e-6  # attacked afresh


@pytest.mark.parametrize("overrides, key", [
    (["+method=at", "method.sam_attack=reuse"], "method.sam_attack"),  # SAM is off: no effect
    (["+method=at", "method.sam=true", "method.sam_attack=again"], "method.sam_attack"),
])
def test_sam_attack_values_are_checked(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        run(compose_cfg(*overrides), tmp_path)
