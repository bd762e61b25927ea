"""Soundness and tightness of the bounds module on tiny random networks (closed form / brute force)."""

import itertools

import pytest
import torch
from torch import nn

from runner import bounds
from runner.attacks import pgd
from runner.layers import Normalize, Residual

TOL = 1e-5


def _randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Random running statistics and affine parameters, negative scales included (sign-aware bounds)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def make_net(kind: str, seed: int = 0) -> nn.Sequential:
    """Tiny eval-mode networks on 1x6x6 inputs, one per layer type the bounds must handle."""
    torch.manual_seed(seed)
    norm = Normalize([0.4], [0.3])
    if kind == "mlp":
        net = nn.Sequential(
            norm, nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)
        )
    elif kind == "conv":
        net = nn.Sequential(
            norm,
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 5, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 2 * 2, 4),
        )
    elif kind == "batch_norm":
        net = nn.Sequential(
            norm,
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(144, 10),
            nn.BatchNorm1d(10),
            nn.ReLU(),
            nn.Linear(10, 4),
        )
    elif kind == "pooling":
        net = nn.Sequential(
            norm,
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 4),
        )
    elif kind == "nested":
        block = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Identity(), nn.ReLU())
        net = nn.Sequential(
            norm,
            nn.Sequential(block, nn.Flatten()),
            nn.Sequential(nn.Linear(48, 6), nn.ReLU()),
            nn.Linear(6, 4),
        )
    elif kind == "residual":
        main = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
        down = Residual(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()), nn.Conv2d(3, 4, 1, stride=2))
        net = nn.Sequential(
            norm,
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            Residual(main),
            nn.ReLU(),
            down,
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 4),
        )
    else:
        raise ValueError(kind)
    _randomise_batch_norm(net, torch.Generator().manual_seed(seed + 100))
    return net.eval()


KINDS = ["mlp", "conv", "batch_norm", "pooling", "nested", "residual"]
FEED_FORWARD = [k for k in KINDS if k != "residual"]


def inputs(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    x[0, 0, :2] = 0.0  # pixels at the image range's edges: the box is clipped there
    x[-1, 0, 4:] = 1.0
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def margins(model, x, y):
    logits = model(x)
    return logits.gather(1, y[:, None]) - logits


def worst_sampled_margins(model, x, y, eps, samples=200, seed=0):
    """Lowest margins seen at random box points, box vertices and PGD points (all inside the box)."""
    g = torch.Generator().manual_seed(seed)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    worst = margins(model, x, y)
    with torch.no_grad():
        for i in range(samples):
            t = torch.rand(x.shape, generator=g)
            if i % 2:
                t = t.round()  # a vertex of the box
            worst = torch.minimum(worst, margins(model, lower + t * (upper - lower), y))
    for target in range(4):

        def margin_loss(logits, labels, target=target):
            return logits[:, target] - logits.gather(1, labels[:, None]).squeeze(1)

        x_adv = pgd(model, x, y, eps=eps, steps=10, loss_fn=margin_loss, generator=g)
        assert ((x_adv - x).abs() <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            worst = torch.minimum(worst, margins(model, x_adv, y))
    return worst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_no_point_in_the_box_leaves_the_bounds(kind, eps):
    model = make_net(kind)
    x, y = inputs()
    worst = worst_sampled_margins(model, x, y, eps)
    methods = ["ibp"] if kind == "residual" else list(bounds.METHODS)
    with torch.no_grad():
        for method in methods:
            lower = bounds.margin_lower_bounds(model, x, y, eps, method=method)
            assert (lower <= worst + TOL).all(), method
            assert (lower.gather(1, y[:, None]) == 0).all()
        logits_lower, logits_upper = bounds.interval_bounds(model, x, eps)
        for _ in range(20):
            x_in = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
            logits = model(x_in)
            assert (logits >= logits_lower - TOL).all() and (logits <= logits_upper + TOL).all()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_eps_bounds_are_the_clean_margins(kind):
    model = make_net(kind)
    x, y = inputs()
    with torch.no_grad():
        expected = margins(model, x, y)
        for method in ["ibp"] if kind == "residual" else bounds.METHODS:
            torch.testing.assert_close(
                bounds.margin_lower_bounds(model, x, y, 0.0, method=method), expected, atol=1e-5, rtol=1e-5
            )


def test_single_affine_layer_is_bounded_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(27, 5)
    ).eval()
    x, eps = torch.rand(4, 1, 6, 6), 0.07
    with torch.no_grad():
        lower, upper = bounds.interval_bounds(nn.Sequential(model[0], model[1], model[2]), x, eps)
        # The exact minimum of an affine function over a box is attained at a vertex chosen by the signs.
        box_lo, box_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        conv = nn.Sequential(model[0], model[1], model[2])
        weights = torch.autograd.functional.jacobian(lambda z: conv(z).sum(0), x[:1]).reshape(27, 36)
        for b in range(len(x)):
            lo, hi = box_lo[b].flatten(), box_hi[b].flatten()
            at_min = torch.where(weights > 0, lo, hi)  # [27, 36]: the minimising vertex per output
            exact_min = torch.stack([conv(v.view(1, 1, 6, 6))[0, i] for i, v in enumerate(at_min)])
            torch.testing.assert_close(lower[b], exact_min, atol=1e-5, rtol=1e-5)
            at_max = torch.where(weights > 0, hi, lo)
            exact_max = torch.stack([conv(v.view(1, 1, 6, 6))[0, i] for i, v in enumerate(at_max)])
            torch.testing.assert_close(upper[b], exact_max, atol=1e-5, rtol=1e-5)


def test_crown_is_exact_on_an_affine_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4)
    )
    _randomise_batch_norm(model, torch.Generator().manual_seed(1))
    model.eval()
    x, y = inputs()
    eps = 0.05
    with torch.no_grad():
        # Exact: each margin is affine in x, minimised at the vertex picked by its gradient's signs.
        exact = torch.empty(len(x), 4)
        for b in range(len(x)):
            for j in range(4):
                xb = x[b : b + 1].clone().requires_grad_(True)
                with torch.enable_grad():
                    logits = model(xb)
                    (grad,) = torch.autograd.grad(logits[0, y[b]] - logits[0, j], xb)
                vertex = torch.where(grad > 0, (xb - eps).clamp(0, 1), (xb + eps).clamp(0, 1))
                exact[b, j] = margins(model, vertex, y[b : b + 1])[0, j]
        # CROWN transposes affine layers exactly; IBP loses the cancellations between layers.
        for method in ("crown_ibp", "crown"):
            found = bounds.margin_lower_bounds(model, x, y, eps, method=method)
            torch.testing.assert_close(found, exact, atol=1e-4, rtol=1e-4)
        ibp = bounds.margin_lower_bounds(model, x, y, eps, method="ibp")
        assert (ibp <= exact + TOL).all() and (ibp < exact - 1e-3).any()


def test_vertex_and_grid_enumeration_bound_ibp_and_crown_from_inside():
    """On a 4-input network, the minimum over a dense grid of the box (vertices included) is a true
    value: every sound lower bound lies below it, and CROWN lies between IBP and it."""
    torch.manual_seed(3)
    model = nn.Sequential(
        Normalize([0.5], [0.5]),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).eval()
    x = torch.tensor([[[[0.3, 0.6], [0.0, 0.9]]]])
    y = torch.tensor([1])
    eps = 0.15
    lo, hi = (x - eps).clamp(0, 1).flatten(), (x + eps).clamp(0, 1).flatten()
    axis = torch.linspace(0, 1, 21)
    grid = torch.tensor(list(itertools.product(axis.tolist(), repeat=4)))
    points = (lo + grid * (hi - lo)).view(-1, 1, 2, 2)
    with torch.no_grad():
        true_min = margins(model, points, y.expand(len(points))).min(0).values
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
        vertices = (lo + corners * (hi - lo)).view(-1, 1, 2, 2)
        vertex_min = margins(model, vertices, y.expand(16)).min(0).values
        assert (true_min <= vertex_min + 1e-6).all()
        found = {m: bounds.margin_lower_bounds(model, x, y, eps, method=m)[0] for m in bounds.METHODS}
    for method, lower in found.items():
        assert (lower <= true_min + TOL).all(), method
    assert (found["crown"] >= found["ibp"] - TOL).sum() >= 2  # CROWN no looser on (almost) every margin


@pytest.mark.parametrize("kind", KINDS)
def test_elided_bounds_are_at_least_as_tight(kind):
    model = make_net(kind, seed=4)
    x, y = inputs()
    with torch.no_grad():
        elided = bounds.ibp_margin_bounds(model, x, y, 0.05, elide=True)
        plain = bounds.ibp_margin_bounds(model, x, y, 0.05, elide=False)
    assert (elided >= plain - TOL).all()
    assert (elided - plain).sum() > 0  # strictly tighter somewhere on a random network


@pytest.mark.parametrize("kind", FEED_FORWARD)
def test_crown_is_tighter_than_ibp_on_average_on_random_networks(kind):
    gains, full_gains = [], []
    for seed in range(3):
        model = make_net(kind, seed=seed)
        x, y = inputs(seed=seed)
        with torch.no_grad():
            ibp = bounds.margin_lower_bounds(model, x, y, 0.05, method="ibp")
            crown_ibp = bounds.margin_lower_bounds(model, x, y, 0.05, method="crown_ibp")
            crown = bounds.margin_lower_bounds(model, x, y, 0.05, method="crown")
        gains.append((crown_ibp - ibp).mean())
        full_gains.append((crown - crown_ibp).mean())
    assert torch.stack(gains).mean() > 0
    assert torch.stack(full_gains).mean() >= 0  # CROWN's own intermediate bounds are intersected with IBP's


def test_batch_norm_in_train_mode_uses_the_clean_batch_statistics():
    model = make_net("batch_norm").train()
    x, y = inputs(n=16)
    logits, stats = bounds.forward_with_bn_stats(model, x)
    assert len(stats) == 2
    for method in bounds.METHODS:
        lower = bounds.margin_lower_bounds(model, x, y, 0.0, method=method, bn_stats=stats)
        torch.testing.assert_close(lower, logits.gather(1, y[:, None]) - logits, atol=1e-4, rtol=1e-4)
    # The statistics stay in the graph: the robust loss reaches every parameter, BN's included.
    lower = bounds.margin_lower_bounds(model, x, y, 0.05, method="crown_ibp", bn_stats=stats)
    bounds.robust_cross_entropy(lower, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(bounds.UnsupportedModel, match="train mode"):
        bounds.margin_lower_bounds(model, x, y, 0.05)


def test_supports_names_what_it_cannot_bound():
    assert bounds.supports(make_net("residual"), "ibp") == (True, "")
    ok, reason = bounds.supports(make_net("residual"), "crown")
    assert not ok and "Residual" in reason
    ok, reason = bounds.supports(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "ibp")
    assert not ok and "Tanh" in reason
    ok, reason = bounds.supports(
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(8, 2)),
        "ibp",
    )
    assert not ok and "padding_mode" in reason
    with pytest.raises(bounds.UnsupportedModel, match="Residual"):
        bounds.margin_lower_bounds(make_net("residual"), *inputs(), 0.1, method="crown")
    with pytest.raises(ValueError, match="bound method"):
        bounds.margin_lower_bounds(make_net("mlp"), *inputs(), 0.1, method="zonotope")
    with pytest.raises(NotImplementedError, match="l2"):
        bounds.margin_lower_bounds(make_net("mlp"), *inputs(), 0.1, norm="l2")


def test_certified_mask_and_worst_case_logits():
    lower = torch.tensor([[0.0, 0.5, 0.1], [0.2, 0.0, -0.1], [1.0, 2.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    assert bounds.certified_mask(lower, y).tolist() == [True, False, True]
    worst = bounds.worst_case_logits(lower, y)
    assert worst.gather(1, y[:, None]).eq(0).all()
    torch.testing.assert_close(worst[0], torch.tensor([0.0, -0.5, -0.1]))


def test_tightness_is_one_when_ibp_is_exact_and_in_unit_interval_otherwise():
    x, y = inputs()
    # One path from each input to the output (a diagonal hidden layer): nothing can cancel, IBP is exact.
    one_path = nn.Sequential(Normalize([0.4], [0.3]), nn.Flatten(), nn.Linear(36, 36), nn.ReLU(), nn.Linear(36, 4))
    with torch.no_grad():
        one_path[2].weight.copy_(torch.diag(torch.randn(36)))
    torch.testing.assert_close(bounds.ibp_tightness(one_path, x, y), torch.ones(len(y)))
    for kind in FEED_FORWARD:
        tightness = bounds.ibp_tightness(make_net(kind), x, y)
        assert ((tightness > 0) & (tightness <= 1 + 1e-6)).all(), kind
    assert bounds.ibp_tightness(make_net("residual"), x, y) is None


def test_tightness_numerator_matches_the_input_gradient():
    """For the linear network at x, the exact box radius of margin j is Σ|∂(z_y − z_j)/∂x|."""
    model = make_net("conv", seed=2)
    x, y = inputs(n=1)
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    exact = torch.stack(
        [torch.autograd.grad(logits[0, y[0]] - logits[0, j], xg, retain_graph=True)[0].abs().sum() for j in range(4)]
    )
    # IBP radius of the same linear network, by propagating |W| and the ReLU pattern layer by layer.
    radius, activation = torch.ones_like(x), x
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.ReLU):
                radius = radius * (activation > 0)
            elif isinstance(layer, nn.Conv2d):
                radius = nn.functional.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding)
            elif isinstance(layer, Normalize):
                radius = radius / layer.std
            else:
                radius = layer(radius)
            activation = layer(activation)
        folded = model[-1].weight[y[0]] - model[-1].weight
        ibp = folded.abs() @ radius.flatten()
    others = torch.arange(4) != y[0]
    expected = (exact[others] / ibp[others]).mean()
    torch.testing.assert_close(bounds.ibp_tightness(model, x, y)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_bounds_run_on_cuda():
    """Under the exact-fp32 context certification runs in (TF32 would differ from the CPU by ~1e-3)."""
    from runner.precision import exact_fp32

    model = make_net("batch_norm").cuda()
    x, y = (t.cuda() for t in inputs())
    with exact_fp32():
        for method in bounds.METHODS:
            lower = bounds.margin_lower_bounds(model, x, y, 0.05, method=method)
            assert lower.device.type == "cuda"
            torch.testing.assert_close(
                lower.cpu(), bounds.margin_lower_bounds(model.cpu(), x.cpu(), y.cpu(), 0.05, method=method)
            )
            model.cuda()


def test_full_crown_refines_intervals_after_two_mixing_layers_without_a_relu():
    """Linear -> Linear -> ReLU: IBP already loses cancellations before the first ReLU, so CROWN's own
    intermediate bounds (exact there) must beat CROWN-IBP's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 10), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
    x, y = inputs()
    with torch.no_grad():
        crown_ibp = bounds.margin_lower_bounds(model, x, y, 0.05, method="crown_ibp")
        crown = bounds.margin_lower_bounds(model, x, y, 0.05, method="crown")
    worst = worst_sampled_margins(model, x, y, 0.05, samples=50)
    assert (crown >= crown_ibp - TOL).all() and (crown > crown_ibp + 1e-4).any()
    assert (crown <= worst + TOL).all()
