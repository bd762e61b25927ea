"""AT's (and HR's) training attack against an independently written PGD loop: the loss is cross-entropy at
the reference loop's output (same seed, same random start), the radius is attack.eps_factor · threat.eps
and the attack runs in attack.bn_mode. In the style of tests/test_trades.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from runner.config import AttackConfig
from runner.hr import hr_weights
from runner.methods import at, hr, trades
from runner.methods.base import StepContext

EPS, STEP, STEPS = 0.05, 0.02, 5


def tiny_model(seed=0):
    """BatchNorm with running statistics far from any batch's: eval and train mode give different attacks."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.2, 3.0)
    return model.train()


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)  # some pixels near 0 and 1: the image box is active
    return x, torch.randint(0, 5, (n,), generator=g)


def ctx(eps=EPS, norm="linf"):
    return StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm=norm, eps=eps)


def build(module=at, method=None, **attack):
    attack = {"steps": STEPS, "alpha": STEP} | attack
    config = module.Config(attack=AttackConfig(**attack), **(method or {}))
    return module.build(OmegaConf.create({"method": OmegaConf.structured(config)}))


def reference_attack(model, x, y, eps, bn_mode="eval", random_start=True):
    """Madry et al.'s PGD written out: U(-eps, eps) start clipped to [0, 1], sign ascent on the summed CE,
    projection to the eps-box and to [0, 1] after each step, last iterate; model in `bn_mode`."""
    model.train(bn_mode == "train")
    x_adv = x.clone()
    if random_start:
        x_adv = (x + (torch.rand(x.shape) * 2 - 1) * eps).clamp(0.0, 1.0)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    return x_adv.detach()


def ours_and_reference(method, eps, bn_mode="eval", random_start=True, seed=5):
    """(method's loss, reference x_adv, reference train-mode logits), each on its own copy of the model so
    that BatchNorm running statistics updated by one cannot leak into the other."""
    model, (x, y) = tiny_model(), batch()
    reference = copy.deepcopy(model)
    torch.manual_seed(seed)
    loss, logs = method.loss(model, x, y, ctx())
    torch.manual_seed(seed)
    x_ref = reference_attack(reference, x, y, eps, bn_mode, random_start)
    return loss, logs, x_ref, reference(x_ref), (x, y)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_at_loss_is_cross_entropy_at_the_reference_pgd(bn_mode):
    loss, logs, x_ref, logits, (x, y) = ours_and_reference(build(bn_mode=bn_mode), EPS, bn_mode)
    expected = F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert logs["train_robust_acc"].item() == pytest.approx((logits.argmax(1) == y).float().mean().item())
    # not vacuous: the reference moved to the box and raised the loss well above the clean one
    assert (x_ref - x).abs().max() == pytest.approx(EPS, abs=1e-6)
    clean = F.cross_entropy(copy.deepcopy(tiny_model())(x), y)
    assert expected.item() > clean.item() + 0.05


def test_zero_start_without_random_start():
    loss, _, x_ref, logits, (_, y) = ours_and_reference(build(random_start=False), EPS, random_start=False)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)


def test_attack_radius_is_eps_factor_times_threat_eps():
    method = build(eps_factor=2.0)
    loss, _, _, logits, (x, y) = ours_and_reference(method, 2.0 * EPS)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
    # the attack itself: outside threat.eps, inside 2·threat.eps
    model = tiny_model()
    x_adv = method.adversarial(model, x, y, ctx())
    assert EPS + 0.01 < (x_adv - x).abs().max() <= 2.0 * EPS + 1e-6
    # and the reference at threat.eps alone gives a different loss (the check above can tell them apart)
    _, _, _, at_threat_eps, _ = ours_and_reference(build(), EPS)
    assert abs(F.cross_entropy(at_threat_eps, y).item() - loss.item()) > 1e-3


def test_the_bn_modes_give_different_attacks_and_the_method_runs_each_in_its_mode():
    """The parametrised loss test can tell the modes apart, and BatchNorm sees the configured mode."""
    _, _, _, eval_logits, (_, y) = ours_and_reference(build(), EPS, "eval")
    _, _, _, train_logits, _ = ours_and_reference(build(), EPS, "train")
    assert abs(F.cross_entropy(eval_logits, y).item() - F.cross_entropy(train_logits, y).item()) > 1e-3
    for bn_mode in ("eval", "train"):
        model, (x, y) = tiny_model(), batch()
        modes = []
        model[1].register_forward_hook(lambda module, inputs, output, modes=modes: modes.append(module.training))
        build(bn_mode=bn_mode).adversarial(model, x, y, ctx())
        assert len(modes) == STEPS and all(m == (bn_mode == "train") for m in modes)
        assert model.training  # the outer step's mode is restored


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_hr_with_alpha_and_r_uses_the_same_attack(bn_mode):
    method = build(hr, {"alpha": 0.1, "r": 0.2}, bn_mode=bn_mode, eps_factor=1.5)
    loss, logs, _, logits, (_, y) = ours_and_reference(method, 1.5 * EPS, bn_mode)
    per_example = F.cross_entropy(logits, y, reduction="none")
    weights, _ = hr_weights(per_example.detach(), 0.1, 0.2)
    assert loss.item() == pytest.approx((weights * per_example).sum().item(), abs=1e-5)
    assert logs["loss_mean"].item() == pytest.approx(per_example.mean().item(), abs=1e-5)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / len(y)))  # really reweighted


@pytest.mark.parametrize("module", [at, hr, trades])
def test_best_checkpoint_selection_scores_the_validation_split_under_pgd(module):
    """Rice et al.'s early stopping: best.pt maximises PGD-10 accuracy on the validation split, not clean."""
    from runner.attacks import accuracy, pgd

    model, (x, _) = tiny_model().eval(), batch(n=64)
    y = model(x).argmax(1)  # clean accuracy 1: only an attack can lower the score
    method = build(module)
    assert method.select_on == "pgd"
    torch.manual_seed(0)
    metrics = method.validate(model, x, y, ctx(eps=0.3))
    torch.manual_seed(0)
    with torch.enable_grad():
        expected = accuracy(model, pgd(model, x, y, eps=0.3, norm="linf", steps=10), y)  # every x is correct
    assert metrics["val/score"] == metrics["val/pgd_acc"] == expected < metrics["val/clean_acc"] == 1.0
