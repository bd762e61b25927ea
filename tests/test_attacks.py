"""PGD invariants on small random models: the ball, the image range, strength, per-example restarts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runner.attacks import pgd, project
from runner.layers import Normalize


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize((0.5,), (0.25,)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 64, 10),
    ).eval()


def batch(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_pgd_stays_in_ball_and_image_range(norm, init):
    model, (x, y) = tiny_model(), batch()
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=5, init=init)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_beats_random_noise(norm):
    model, (x, y) = tiny_model(), batch(256)
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=10)
    noise = project(torch.randn_like(x) * eps, x, eps, norm)
    with torch.no_grad():
        adv_loss = F.cross_entropy(model(x_adv), y, reduction="none")
        noise_loss = F.cross_entropy(model(x + noise), y, reduction="none")
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
    assert (adv_loss >= clean_loss - 1e-6).float().mean() > 0.95
    assert adv_loss.mean() > noise_loss.mean()


def test_restarts_keep_the_per_example_worst_case():
    model, (x, _) = tiny_model(), batch(256)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correct, so some survive and restarts matter
    kwargs = dict(eps=0.03, norm="linf", steps=2)
    best = pgd(model, x, y, restarts=4, generator=torch.Generator().manual_seed(7), **kwargs)
    # The same random starts, one restart at a time: the generator is consumed in the same order.
    g = torch.Generator().manual_seed(7)
    candidates = [pgd(model, x, y, restarts=1, generator=g, **kwargs) for _ in range(4)]
    with torch.no_grad():
        logits = torch.stack([model(c) for c in candidates])  # R x N x K
        losses = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits])
        wrong = logits.argmax(2) != y
        best_logits = model(best)
    best_wrong = best_logits.argmax(1) != y
    assert torch.equal(best_wrong, wrong.any(0)), "a point fooled by any restart must be reported fooled"
    fooled_nowhere = ~wrong.any(0)
    best_loss = F.cross_entropy(best_logits, y, reduction="none")
    assert torch.allclose(best_loss[fooled_nowhere], losses.max(0).values[fooled_nowhere], atol=1e-5)
    # and never a single choice for the whole batch: different points pick different restarts
    assert fooled_nowhere.sum() > 10 and wrong.any(0).sum() > 0
    picked = (losses - best_loss).abs().argmin(0)
    assert picked[fooled_nowhere].unique().numel() > 1


def test_l2_zero_gradient_gives_no_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(model[1].weight)
    x, y = batch(8)
    x_adv = pgd(model, x, y, eps=0.5, norm="l2", steps=3)
    assert torch.isfinite(x_adv).all()


def test_zero_eps_is_identity_and_bad_norm_is_named():
    model, (x, y) = tiny_model(), batch(8)
    assert torch.equal(pgd(model, x, y, eps=0.0), x)
    with pytest.raises(ValueError, match="threat.norm"):
        pgd(model, x, y, eps=0.1, norm="l1")


def test_pgd_keeps_the_model_mode():
    model, (x, y) = tiny_model(), batch(8)
    model.train()
    pgd(model, x, y, eps=0.1, steps=2)
    assert model.training
