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


# ---- strength: closed-form worst cases on linear-then-monotone models, brute force on a 2-D ReLU net ----


def linear_then_monotone(dim=16, seed=0, squash=False):
    """Two logits whose margin is a monotone function of one linear form w·x: the worst case over the
    L∞ box is known in closed form, coordinate by coordinate."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(dim, 1)]
    layers += [nn.Tanh()] if squash else []  # monotone: the gradient direction stays ±w, its size changes
    layers += [nn.Linear(1, 2)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[-1].weight.copy_(torch.tensor([[2.0], [-1.0]]))  # margin z_0 - z_1 increases with w·x
        model[-1].bias.zero_()
    return model


def margin(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, 1 - y[:, None]).squeeze(1)


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("steps", [10, 50])
def test_linf_pgd_reaches_the_closed_form_worst_case(steps, squash):
    model = linear_then_monotone(squash=squash)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 1, 4, 4, generator=g)  # many pixels within eps of 0 or 1: the image box is active
    y = torch.randint(0, 2, (64,), generator=g)
    eps = 0.1
    w = model[1].weight.detach().view(1, 1, 4, 4)
    toward_other = torch.where(y == 0, -1.0, 1.0).view(-1, 1, 1, 1)  # the sign that lowers the true margin
    worst = (x + eps * toward_other * w.sign()).clamp(0, 1)
    assert ((x + eps * toward_other * w.sign() - worst).abs() > 1e-3).any()  # the box does clip some
    x_adv = pgd(model, x, y, eps=eps, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x_adv, worst, atol=1e-6)
    assert torch.allclose(margin(model, x_adv, y), margin(model, worst, y), atol=1e-5)
    # with the margin loss (the evaluator's loss="margin") too
    from runner.evaluators.pgd import margin_loss

    x_adv = pgd(model, x, y, eps=eps, steps=steps, loss_fn=margin_loss, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x_adv, worst, atol=1e-6)


@pytest.mark.parametrize("init, rtol", [("zero", 1e-4), ("uniform", 0.03)])
def test_l2_pgd_reaches_the_closed_form_worst_case(init, rtol):
    """Where the [0, 1] box is not active, the L2 worst case is x - eps·w/‖w‖ (towards the other class).
    From zero PGD walks straight there; from a random start the off-axis part shrinks by about
    1/(1 + alpha/eps) per step, so 10 steps leave a few percent of the attack's effect at most."""
    model = linear_then_monotone(squash=True)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 1, 4, 4, generator=g) * 0.4 + 0.3  # eps·|w_i|/‖w‖ <= eps = 0.25 keeps it in [0, 1]
    y = torch.randint(0, 2, (64,), generator=g)
    eps = 0.25
    w = model[1].weight.detach().view(1, 1, 4, 4)
    toward_other = torch.where(y == 0, -1.0, 1.0).view(-1, 1, 1, 1)
    worst = x + eps * toward_other * w / w.norm()
    assert worst.min() > 0 and worst.max() < 1
    x_adv = pgd(model, x, y, eps=eps, norm="l2", init=init, generator=torch.Generator().manual_seed(0))
    best = margin(model, worst, y)
    reached = margin(model, x_adv, y)
    assert (reached >= best - 1e-5).all()  # nothing in the ball beats the closed form
    effect = margin(model, x, y) - best  # what the exact worst case takes off the margin
    assert effect.min() > 0.05
    assert ((reached - best) <= rtol * effect + 1e-6).all(), ((reached - best) / effect).max()
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


def two_d_relu_net(seed=0):
    """Steep enough that the margin over an eps-box has many linear pieces and several local optima."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[0].bias.uniform_(-5, 5)
    return model


def test_pgd_with_restarts_reaches_the_grid_optimum_on_a_2d_relu_net():
    """Brute force: the margin loss over a 201x201 grid of the eps-box ∩ [0, 1]² against PGD-50 with 10
    restarts. A single restart stops in a local optimum on several points: the grid tells them apart."""
    from runner.evaluators.pgd import margin_loss

    model = two_d_relu_net()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(24, 2, generator=g)
    eps = 0.15
    with torch.no_grad():
        y = model(x).argmax(1)
        t = torch.linspace(-eps, eps, 201)
        grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).view(-1, 2)
        grid_best = torch.stack(
            [margin_loss(model((x[i] + grid).clamp(0, 1)), y[i].expand(len(grid))).max() for i in range(len(y))]
        )
        clean = margin_loss(model(x), y)

    def gaps(restarts):
        generator = torch.Generator().manual_seed(0)
        x_adv = pgd(model, x, y, eps=eps, steps=50, restarts=restarts, loss_fn=margin_loss, generator=generator)
        assert ((x_adv - x).abs().amax(1) <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            return grid_best - margin_loss(model(x_adv), y)

    assert (grid_best - clean).min() > 0.01  # every point has something to find
    assert gaps(10).max() < 0.01
    assert gaps(1).max() > 0.03  # not vacuous: the local optima are real


@pytest.mark.parametrize("eps,alpha", [(8 / 255, 2 / 255), (0.1, 0.025), (0.3, 0.375)])
def test_linf_loops_are_bitwise_the_aten_steps(eps, alpha, monkeypatch):
    """The one-pass L∞ step and uniform start (float32 on a CPU) give the bits of the ATen formulation,
    with pixels at 0 and 1, zero gradients and perturbations outside the ball; and a whole attack is
    unchanged by them."""
    from runner import attacks

    assert attacks._linf_loops() is not None, "numba is a dependency: the loops must be available"
    monkeypatch.setattr(attacks, "LOOP_MIN_ELEMENTS", 1)  # a small batch, taking the loops all the same
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 5, 5, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * 2 * eps
    grad = torch.randn(x.shape, generator=g)
    grad[0, 0, 1, :2] = torch.tensor([0.0, -0.0])
    model = nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), nn.Flatten(), nn.Linear(75, 4))
    y = torch.arange(6) % 4

    def run():
        step = attacks._step(delta, grad, x, alpha, eps, "linf")
        start = attacks.random_start(x, eps, "linf", "uniform", 0.0, torch.Generator().manual_seed(1))
        adversarial = pgd(model, x, y, eps=eps, alpha=alpha, steps=3, generator=torch.Generator().manual_seed(2))
        return step, start, adversarial

    loops, calls = attacks._linf_loops(), []

    def counted(loop):
        return lambda *args: calls.append(loop) or loop(*args)

    monkeypatch.setattr(attacks, "_linf_loops", lambda: tuple(counted(loop) for loop in loops))
    fused = run()
    assert calls.count(loops[0]) == 1 + 3 and calls.count(loops[1]) == 1 + 1  # each pgd step took the loop
    monkeypatch.setattr(attacks, "_linf_loops", lambda: None)
    for ours, aten in zip(fused, run(), strict=True):
        assert torch.equal(ours, aten)
    monkeypatch.undo()
    assert attacks._use_loops(torch.rand(128, 3, 32, 32)) and not attacks._use_loops(torch.rand(64, 1, 8, 8))
