import math

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from runner.config import AttackConfig
from runner.hr import hr_weights
from runner.methods import at, hr
from runner.methods.base import StepContext


def conic_hr(losses: np.ndarray, alpha: float, r: float):
    """The reference library's conic program (exponential cone), solved by a general-purpose solver:
    max Σ p_i ℓ_i + p_{n+1}·max ℓ  s.t. q + s = 1/n, Σ s ≤ α, Σ_j q_j log(q_j/p_j) ≤ r."""
    n = len(losses)
    p, q = cp.Variable(n + 1, nonneg=True), cp.Variable(n + 1, nonneg=True)
    s, t = cp.Variable(n, nonneg=True), cp.Variable(n + 1)
    constraints = [
        cp.sum(p) == 1,
        cp.sum(q) == 1,
        cp.constraints.ExpCone(-t, q, p),  # t_j ≥ q_j log(q_j/p_j)
        cp.sum(t) <= r,
        cp.sum(s) <= alpha,
        q[:n] + s == np.full(n, 1.0 / n),
    ]
    problem = cp.Problem(cp.Maximize(p[:n] @ losses + p[n] * losses.max()), constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    weights = p.value[:n].copy()
    weights[np.argmax(losses)] += p.value[n]  # the extra atom shares the max loss
    return weights, problem.value


@pytest.mark.parametrize(
    "alpha, r, n, seed",
    [
        (0.0, 0.1, 64, 0),
        (0.05, 0.1, 128, 1),
        (0.1, 1.0, 50, 2),
        (0.0, 0.01, 64, 3),
        (0.3, 3.0, 32, 4),
        (0.2, 0.5, 100, 5),
    ],
)
def test_closed_form_matches_the_conic_program(alpha, r, n, seed):
    rng = np.random.default_rng(seed)
    losses = rng.exponential(size=n) * rng.uniform(0.1, 3.0)
    weights, value = hr_weights(torch.tensor(losses, dtype=torch.float32), alpha, r)
    # float32 in, as in training: compare against the solver on the same rounded losses
    losses32 = torch.tensor(losses, dtype=torch.float32).double().numpy()
    expected_weights, expected_value = conic_hr(losses32, alpha, r)
    assert weights.dtype == torch.float64
    assert np.abs(weights.numpy() - expected_weights).max() < 1e-5
    assert abs(value.item() - expected_value) < 1e-5
    assert abs(weights.sum().item() - 1) < 1e-12 and weights.min() >= 0
    assert abs(value.item() - float(weights @ torch.tensor(losses32))) < 1e-12


def random_losses(n=40, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_alpha_and_r_zero_is_the_mean():
    losses = random_losses()
    weights, value = hr_weights(losses, 0.0, 0.0)
    assert torch.equal(weights, torch.full_like(losses, 1 / len(losses)))
    assert torch.allclose(value, losses.mean())


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.13, 0.5])
def test_r_to_zero_is_the_trimmed_mean_plus_alpha_max(alpha):
    losses = random_losses()
    n = len(losses)
    sorted_losses = losses.sort().values
    whole, part = divmod(alpha * n, 1.0)  # ⌊αn⌋ smallest removed fully, the next one by a fraction
    whole = int(whole)
    trimmed = (sorted_losses[whole + 1 :].sum() + (1 - part) * sorted_losses[whole]) / n
    expected = trimmed + alpha * losses.max()
    assert torch.allclose(hr_weights(losses, alpha, 0.0)[1], expected, atol=1e-12)
    assert torch.allclose(hr_weights(losses, alpha, 1e-9)[1], expected, atol=1e-4)


def test_r_to_infinity_is_the_max():
    losses = random_losses()
    for r in (20.0, 200.0, 5000.0):
        weights, value = hr_weights(losses, 0.05, r)
        assert value.item() == pytest.approx(losses.max().item(), abs=1e-6)
        assert weights[losses.argmax()] > 1 - 1e-6


def test_value_grows_with_alpha_and_r_between_mean_and_max():
    losses = random_losses()
    values = [hr_weights(losses, a, r)[1].item() for a, r in [(0, 0), (0, 0.05), (0.05, 0.05), (0.05, 0.5)]]
    assert values == sorted(values) and len(set(values)) == 4
    assert losses.mean() <= values[0] and values[-1] <= losses.max()


@pytest.mark.parametrize("alpha, r", [(0.0, 0.1), (0.05, 0.1), (0.2, 2.0)])
def test_shift_and_scale_equivariance(alpha, r):
    losses = random_losses()
    weights, value = hr_weights(losses, alpha, r)
    shifted_weights, shifted = hr_weights(losses + 7.5, alpha, r)
    scaled_weights, scaled = hr_weights(losses * 0.3, alpha, r)
    assert torch.allclose(shifted, value + 7.5, atol=1e-9)
    assert torch.allclose(shifted_weights, weights, atol=1e-9)
    assert torch.allclose(scaled, value * 0.3, atol=1e-9)
    assert torch.allclose(scaled_weights, weights, atol=1e-9)


def test_degenerate_batches():
    equal = torch.full((8,), 0.7, dtype=torch.float64)
    weights, value = hr_weights(equal, 0.1, 0.5)
    assert torch.allclose(value, torch.tensor(0.7, dtype=torch.float64))
    assert torch.allclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    single_weights, single_value = hr_weights(torch.tensor([2.0]), 0.1, 0.5)
    assert single_weights.tolist() == [1.0] and single_value.item() == 2.0


@pytest.mark.parametrize(
    "losses, alpha, r, key",
    [
        (torch.ones(4), 1.0, 0.1, "method.alpha"),
        (torch.ones(4), -0.1, 0.1, "method.alpha"),
        (torch.ones(4), 0.1, -1.0, "method.r"),
        (torch.ones(4), 0.1, math.inf, "method.r"),
        (torch.tensor([1.0, float("nan")]), 0.1, 0.1, "finite"),
        (torch.ones(2, 2), 0.1, 0.1, "1-D"),
    ],
)
def test_bad_input_is_rejected(losses, alpha, r, key):
    with pytest.raises(ValueError, match=key):
        hr_weights(losses, alpha, r)


# --- the training method -------------------------------------------------------------------------------


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def run_cfg(module, **method):
    attack = AttackConfig(steps=3)
    node = OmegaConf.structured(module.Config(attack=attack, **method))
    return OmegaConf.create({"method": node, "train": {"grad_clip": None, "precision": "fp32"}})


CTX = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="linf", eps=0.1)


def train_steps(module, steps=3, **method):
    from runner.update import build_update

    cfg = run_cfg(module, **method)
    model, (x, y) = tiny_model(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    update, trainer = build_update(cfg, model, optimizer), module.build(cfg)
    model.train()
    torch.manual_seed(123)
    for _ in range(steps):
        logs = update(model, trainer, x, y, CTX)
    return model, logs


def test_alpha_r_zero_trains_exactly_like_at():
    hr_model, logs = train_steps(hr, alpha=0.0, r=0.0)
    at_model, _ = train_steps(at)
    for a, b in zip(hr_model.state_dict().values(), at_model.state_dict().values()):
        assert torch.equal(a, b)
    assert logs["hr/max_weight"] == pytest.approx(1 / 32)
    assert logs["hr/weight_entropy"] == pytest.approx(math.log(32))
    differs, _ = train_steps(hr, alpha=0.05, r=0.1)
    assert not torch.equal(differs[1].weight, at_model[1].weight)


def test_gradient_is_the_weighted_sum_with_constant_weights(monkeypatch):
    cfg = run_cfg(hr, alpha=0.05, r=0.1)
    model, (x, y) = tiny_model(), batch()
    model.train()
    method = hr.build(cfg)
    x_adv = (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)
    monkeypatch.setattr(method, "adversarial", lambda *args, **kwargs: x_adv)
    loss, logs = method.loss(model, x, y, CTX)
    model.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]

    per_example = F.cross_entropy(model(x_adv), y, reduction="none")
    weights, value = hr_weights(per_example.detach(), 0.05, 0.1)
    model.zero_grad()
    (weights.float() * per_example).sum().backward()  # Danskin: weights as constants
    assert torch.allclose(loss, value.float(), atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))
    assert logs["hr/max_weight"] == pytest.approx(weights.max().item())
    assert 0 < logs["hr/weight_entropy"] < math.log(32)


def test_no_attack_at_eps_zero():
    cfg = run_cfg(hr, alpha=0.05, r=0.1)
    model, (x, y) = tiny_model(), batch()
    model.train()
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="linf", eps=0.0)
    loss, _ = hr.build(cfg).loss(model, x, y, ctx)
    per_example = F.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(loss, hr_weights(per_example, 0.05, 0.1)[1].float(), atol=1e-6)


def test_keys_and_presets_compose():
    from hydra import compose, initialize_config_module

    from runner.config import register_configs

    register_configs()
    with initialize_config_module("runner.configs", version_base=None):
        overrides = ["+method=hr", "method.alpha=0.05", "method.r=0.1", "threat.norm=l2"]
        cfg = compose("train", overrides=overrides)
        assert (cfg.method.alpha, cfg.method.r, cfg.threat.norm) == (0.05, 0.1, "l2")
        cifar = compose("train", overrides=["experiment=cifar10_hr"])
        assert (cifar.model.name, cifar.method.r, cifar.method.alpha, cifar.train.epochs) == (
            "preact_resnet18",
            0.2,
            0.0,
            200,
        )
        assert cifar.method.attack.bn_mode == "train" and cifar.method.attack.steps == 10
        mnist = compose("train", overrides=["experiment=mnist_hr"])
        assert (mnist.method.alpha, mnist.method.r, mnist.threat.norm) == (0.05, 0.1, "l2")
        assert (mnist.threat.eps, mnist.method.attack.steps, mnist.method.attack.alpha) == (0.2, 40, 0.01)
        assert (mnist.dataset.label_noise, mnist.dataset.train_fraction, mnist.train.epochs) == (0.25, 0.05, 1500)
        with pytest.raises(ValueError, match="method.alpha"):
            hr.build(compose("train", overrides=["+method=hr", "method.alpha=1.5"]))


def test_cpu_smoke_run_and_alpha_r_zero_run_equals_at(compose_cfg, tmp_path):
    import json

    from runner import checkpoint
    from runner.train import run

    fast = ("method.attack.steps=2", "train.epochs=1", "train.log_every=5", "train.progress=plain", "eval=none")
    results = run(compose_cfg("+method=hr", "method.alpha=0.05", "method.r=0.1", *fast), tmp_path / "hr")
    assert results["run"]["method"] == "hr"
    rows = [json.loads(line) for line in (tmp_path / "hr" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "hr/max_weight" in row]
    assert logged and all(1 / 64 < row["hr/max_weight"] <= 1 for row in logged)
    assert all(0 < row["hr/weight_entropy"] < math.log(64) for row in logged)

    run(compose_cfg("+method=hr", "method.alpha=0", "method.r=0", *fast), tmp_path / "hr0")
    run(compose_cfg("+method=at", *fast), tmp_path / "at")
    hr0 = checkpoint.load(tmp_path / "hr0" / "checkpoints" / "last.pt")["model"]
    at_ = checkpoint.load(tmp_path / "at" / "checkpoints" / "last.pt")["model"]
    assert hr0.keys() == at_.keys() and all(torch.equal(hr0[k], at_[k]) for k in hr0)


def test_phi_keeps_a_trimmed_sample_out_where_its_ratio_underflows():
    """At the smallest subnormal τ, u_j = τ/(τ + a_j) rounds to 0 for a large gap: a sample with q_j = 0
    (trimmed by α) must add nothing there (log 0 · 0 is NaN in a plain product), as in xlogy's form."""
    from runner.hr import _phi

    q = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    gaps = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    tau = torch.tensor([5e-324, 0.5, 3.0], dtype=torch.float64)
    u = tau[:, None] / (tau[:, None] + gaps)
    assert u[0, 0] == 0 and u[0, 1] > 0  # the trimmed sample's ratio underflows, the others' do not
    expected = torch.log(u @ q) - torch.xlogy(q, u).sum(-1) - 0.1
    assert torch.isfinite(_phi(tau, q, gaps, 0.1)).all()
    torch.testing.assert_close(_phi(tau, q, gaps, 0.1), expected, rtol=1e-12, atol=0)
