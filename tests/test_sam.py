import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from runner.methods.base import Method, StepContext
from runner.update import SAMUpdate, Update, build_update

CTX = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="linf", eps=0.1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))


def batch(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def cfg(sam=True, rho=None, adaptive=False, grad_clip=None, precision="fp32"):
    return OmegaConf.create(
        {
            "method": {"name": "erm", "sam": sam, "rho": rho, "adaptive": adaptive},
            "train": {"grad_clip": grad_clip, "precision": precision},
        }
    )


class RecordingCE(Method):
    """Cross-entropy that records the weights and autocast state it was called with."""

    def __init__(self, value=None):
        super().__init__(None)
        self.seen, self.autocast, self.value = [], [], value

    def loss(self, model, x, y, ctx):
        self.seen.append([p.detach().clone() for p in model.parameters()])
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        loss = F.cross_entropy(model(x), y)
        if self.value is not None and len(self.seen) in self.value:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}


def gradient(model, x, y):
    model = copy.deepcopy(model)
    model.train()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (False, 0.3), (True, 2.0)])
def test_perturbation_norm_is_rho_and_second_pass_runs_at_w_plus_e(adaptive, rho):
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    g = gradient(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = RecordingCE()
    build_update(cfg(rho=rho, adaptive=adaptive), model, optimizer)(model, method, x, y, CTX)

    assert len(method.seen) == 2
    e = [b - a for a, b in zip(method.seen[0], method.seen[1])]
    if adaptive:  # ASAM: e = ρ T²g/‖Tg‖ with T = |w|, so ‖e/T‖ = ρ
        assert torch.allclose(
            flat(e),
            rho
            * flat([w * w * gi for w, gi in zip(originals, g)])
            / flat([w.abs() * gi for w, gi in zip(originals, g)]).norm(),
            atol=1e-6,
        )
        scale = flat(originals).abs()  # BN's zero-initialised biases get no perturbation (T = 0)
        e_over_t = torch.where(scale > 0, flat(e) / scale, torch.zeros_like(scale))
        assert e_over_t.norm().item() == pytest.approx(rho, rel=1e-4)
    else:  # SAM: e = ρ g/‖g‖
        assert flat(e).norm().item() == pytest.approx(rho, rel=1e-5)
        assert torch.allclose(flat(e), rho * flat(g) / flat(g).norm(), atol=1e-6)


@pytest.mark.parametrize("scale, eta", [("weights", 0.01), ("weights", 0.0), ("all", 0.01)])
def test_asam_variants_follow_their_reference(scale, eta):
    """SamsungLabs/ASAM: T = |w| + eta on the parameters named weight (BatchNorm's included), T = 1 on
    biases; davda54/sam (scale=all): every parameter."""
    model, (x, y) = tiny_model(), batch()
    names = [name for name, _ in model.named_parameters()]
    originals = [p.detach().clone() for p in model.parameters()]
    g = gradient(model, x, y)
    config = cfg(rho=0.5, adaptive=True)
    config.method.asam_scale, config.method.asam_eta = scale, eta
    method = RecordingCE()
    build_update(config, model, torch.optim.SGD(model.parameters(), lr=0.1))(model, method, x, y, CTX)
    t = [w.abs() + eta if scale == "all" or name.endswith("weight") else torch.ones_like(w)
         for name, w in zip(names, originals)]
    norm = flat([ti * gi for ti, gi in zip(t, g)]).norm()
    expected = [0.5 * ti * ti * gi / norm for ti, gi in zip(t, g)]
    for name, before, after, e in zip(names, *method.seen, expected):
        torch.testing.assert_close(after - before, e, rtol=1e-4, atol=1e-7, msg=name)
    bn_bias = dict(zip(names, zip(*method.seen)))["1.bias"]  # zero-initialised: T = eta, or 1 when unscaled
    assert torch.equal(bn_bias[0], bn_bias[1]) == (scale == "all" and eta == 0)


def test_base_optimizer_steps_from_the_original_weights_with_the_second_gradient():
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    probe = copy.deepcopy(model)
    g = gradient(model, x, y)
    with torch.no_grad():
        for p, gi in zip(probe.parameters(), g):
            p.add_(0.05 * gi / flat(g).norm())
    g_perturbed = gradient(probe, x, y)
    build_update(cfg(), model, torch.optim.SGD(model.parameters(), lr=0.5))(model, RecordingCE(), x, y, CTX)
    for p, w, gp in zip(model.parameters(), originals, g_perturbed):
        assert torch.allclose(p, w - 0.5 * gp, atol=1e-6)


def test_restored_weights_equal_the_originals_bit_for_bit():
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    update = build_update(cfg(rho=0.7), model, torch.optim.SGD(model.parameters(), lr=0.0))
    update(model, RecordingCE(), x, y, CTX)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), originals))


def test_bn_running_statistics_see_the_first_pass_only():
    model, (x, y) = tiny_model(), batch()
    model.train()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)  # exactly one train-mode forward: what the first pass does to the statistics
    build_update(cfg(), model, torch.optim.SGD(model.parameters(), lr=0.1))(model, RecordingCE(), x, y, CTX)
    bn, expected = model[1], reference[1]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_only_the_second_gradient_is_clipped():
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    g = gradient(model, x, y)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, gi in zip(probe.parameters(), g):
            p.add_(0.05 * gi / flat(g).norm())  # an unclipped first gradient sets the direction
    g_perturbed = flat(gradient(probe, x, y))
    clip = 0.1 * g_perturbed.norm().item()
    method = RecordingCE()
    update = build_update(cfg(grad_clip=clip), model, torch.optim.SGD(model.parameters(), lr=1.0))
    logs = update(model, method, x, y, CTX)
    step = flat([w - p for w, p in zip(originals, model.parameters())])
    assert step.norm().item() == pytest.approx(clip, rel=1e-4)  # the second gradient, clipped to `clip`
    assert torch.allclose(step, g_perturbed * clip / g_perturbed.norm(), atol=1e-6)
    assert logs["grad_norm"].item() == pytest.approx(g_perturbed.norm().item(), rel=1e-5)


def test_plain_update_clips_and_steps():
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    g = flat(gradient(model, x, y))
    update = build_update(cfg(sam=False, grad_clip=1e-3), model, torch.optim.SGD(model.parameters(), lr=1.0))
    assert type(update) is Update
    method = RecordingCE()
    update(model, method, x, y, CTX)
    assert len(method.seen) == 1
    step = flat([w - p for w, p in zip(originals, model.parameters())])
    assert torch.allclose(step, g * 1e-3 / g.norm(), atol=1e-7)


@pytest.mark.parametrize("sam, nan_calls", [(False, {1}), (True, {1}), (True, {2})])
def test_non_finite_loss_does_not_step(sam, nan_calls):
    model, (x, y) = tiny_model(), batch()
    model.train()
    originals = [p.detach().clone() for p in model.parameters()]
    update = build_update(cfg(sam=sam), model, torch.optim.SGD(model.parameters(), lr=0.1))
    logs = update(model, RecordingCE(value=nan_calls), x, y, CTX)
    assert logs["nonfinite"] == 1.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), originals))


@pytest.mark.parametrize("sam", [False, True])
def test_bf16_computes_the_loss_under_autocast(sam):
    model, (x, y) = tiny_model(), batch()
    model.train()
    method = RecordingCE()
    logs = build_update(cfg(sam=sam, precision="bf16"), model, torch.optim.SGD(model.parameters(), lr=0.1))(
        model, method, x, y, CTX
    )
    assert method.autocast == [True] * (2 if sam else 1)
    assert torch.isfinite(logs["loss"]) and logs["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_rho_defaults_and_validation():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert build_update(cfg(), model, optimizer).rho == 0.05
    assert build_update(cfg(adaptive=True), model, optimizer).rho == 2.0
    assert isinstance(build_update(cfg(rho=0.2), model, optimizer), SAMUpdate)
    with pytest.raises(ValueError, match="method.rho"):
        build_update(cfg(rho=-1.0), model, optimizer)
    with pytest.raises(ValueError, match="train.precision"):
        build_update(cfg(precision="fp16"), model, optimizer)
    with pytest.raises(ValueError, match="train.grad_clip"):
        build_update(cfg(grad_clip=0.0), model, optimizer)
    no_method = OmegaConf.create({"method": None, "train": {"grad_clip": None, "precision": "fp32"}})
    assert type(build_update(no_method, model, optimizer)) is Update


@pytest.mark.parametrize("name", ["sam", "at", "trades", "hr"])
def test_sam_composes_with_every_method(name):
    import importlib

    from hydra import compose, initialize_config_module

    from runner.config import register_configs

    register_configs()
    overrides = [f"+method={name}"] + ([] if name == "sam" else ["method.sam=true", "method.attack.steps=2"])
    with initialize_config_module("runner.configs", version_base=None):
        run_cfg = compose("train", overrides=overrides)
    assert run_cfg.method.sam
    method = importlib.import_module(f"runner.methods.{name}").build(run_cfg)
    calls = []
    original_loss = method.loss
    method.loss = lambda *args: calls.append(1) or original_loss(*args)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    model.train()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(0, 5, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    logs = build_update(run_cfg, model, torch.optim.SGD(model.parameters(), lr=0.1))(model, method, x, y, CTX)
    assert len(calls) == 2 and "loss" in logs and "nonfinite" not in logs
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_sam_method_requires_sam():
    from runner.methods import sam

    with pytest.raises(ValueError, match="method.sam"):
        sam.build(OmegaConf.create({"method": {"name": "sam", "sam": False, "rho": None, "adaptive": False}}))


@pytest.mark.parametrize(
    "overrides",
    [("+method=sam",), ("+method=trades", "method.sam=true", "method.attack.steps=2", "dataset.label_noise=0.3")],
)
def test_cpu_smoke_run(compose_cfg, tmp_path, overrides, monkeypatch):
    import json

    import runner.train
    from runner.data import load_splits

    # What the run trains, validates and evaluates on: the loader's labels, validate's, evaluate's.
    seen = {"val": []}
    loader, build_method, evaluate = runner.train.InMemoryLoader, runner.train.build_method, runner.train.evaluate

    def recording_loader(x, y, *args, **kwargs):
        seen["train"] = y.clone()
        return loader(x, y, *args, **kwargs)

    def recording_method(cfg):
        method = build_method(cfg)
        validate = method.validate
        method.validate = lambda model, x, y, ctx: seen["val"].append(y.clone()) or validate(model, x, y, ctx)
        return method

    def recording_evaluate(model, cfg, x, y, *args, **kwargs):
        seen["test"] = y.clone()
        return evaluate(model, cfg, x, y, *args, **kwargs)

    monkeypatch.setattr(runner.train, "InMemoryLoader", recording_loader)
    monkeypatch.setattr(runner.train, "build_method", recording_method)
    monkeypatch.setattr(runner.train, "evaluate", recording_evaluate)
    fast = ("train.epochs=2", "train.log_every=5", "train.progress=plain", "eval.n_examples=100")
    cfg = compose_cfg(*overrides, *fast)
    results = runner.train.run(cfg, tmp_path)
    assert 0 <= results["metrics"]["pgd/acc"] <= results["metrics"]["clean/acc"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("sam/loss_perturbed" in row for row in rows)
    noise = results["run"]["label_noise"]
    fraction = 0.3 if "dataset.label_noise=0.3" in overrides else 0.0
    assert noise["fraction"] == fraction

    clean = load_splits(compose_cfg("dataset.label_noise=0").dataset, cfg.seed)
    changed = seen["train"] != clean.train[1]
    assert changed.sum().item() == round(fraction * len(changed))  # 386 of 1,287 trained on a wrong label
    assert noise.get("flipped", 0) == changed.sum().item()  # results.json says how many
    assert len(seen["val"]) == 2 and all(torch.equal(y, clean.val[1]) for y in seen["val"])
    assert torch.equal(seen["test"], clean.test[1])


@pytest.mark.parametrize(
    "overrides, rho",
    [
        (["+method=sam"], 0.15),  # digits' recipe (dataset/digits.yaml)
        (["+method=sam", "method.adaptive=true"], 2.0),  # ASAM's reference radius: digits sets no asam_rho
        (["+method=sam", "dataset=mnist"], 0.05),  # elsewhere the reference's
        (["+method=sam", "method.rho=0.3"], 0.3),  # the command line wins
        (["experiment=cifar10_sam"], 0.05),
        (["experiment=cifar10_sam", "method.adaptive=true"], 2.0),
    ],
)
def test_rho_comes_from_the_dataset_recipe_unless_given(overrides, rho):
    from hydra import compose, initialize_config_module

    from runner.config import register_configs

    register_configs()
    with initialize_config_module("runner.configs", version_base=None):
        run_cfg = compose("train", overrides=overrides)
    model = tiny_model()
    assert build_update(run_cfg, model, torch.optim.SGD(model.parameters(), lr=0.1)).rho == rho


@pytest.mark.parametrize("overrides, key", [
    (["+method=sam", "method.asam_eta=0.01"], "method.asam_eta"),  # plain SAM: no effect
    (["+method=at", "method.asam_scale=weights"], "method.asam_scale"),  # SAM off
    (["+method=sam", "method.adaptive=true", "method.asam_scale=bias"], "method.asam_scale"),
    (["+method=sam", "method.adaptive=true", "method.asam_eta=-0.1"], "method.asam_eta"),
])
def test_asam_settings_are_checked(compose_cfg, tmp_path, overrides, key):
    from runner.errors import ConfigError
    from runner.train import run

    with pytest.raises(ConfigError, match=key):
        run(compose_cfg(*overrides), tmp_path)


def test_m_sharpness_perturbs_each_chunk_on_its_own_gradient():
    """Foret et al.'s m-sharpness, by hand: per chunk c, e_c = rho g_c / ||g_c|| from the chunk's own
    gradient, g'_c = grad L_c(w + e_c); the step uses the size-weighted mean of the g'_c."""
    x, y = batch(n=20)
    rho, lr = 0.3, 0.1
    config = cfg(rho=rho)
    config.method.sam_m = 8  # chunks of 8, 8 and 4
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    reference = copy.deepcopy(model)
    logs = build_update(config, model, optimizer)(model, RecordingCE(), x, y, CTX)
    assert logs["sam/chunks"] == 3.0
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for xc, yc in zip(x.split(8), y.split(8)):
        g = gradient(reference, xc, yc)
        scale = rho / (flat(g).norm() + 1e-12)
        shifted = copy.deepcopy(reference)
        with torch.no_grad():
            for p, gp in zip(shifted.parameters(), g):
                p.add_(gp * scale)
        for total, gp in zip(expected, gradient(shifted, xc, yc)):
            total.add_(gp * (len(yc) / len(y)))
    for p, p0, g in zip(model.parameters(), reference.parameters(), expected):
        assert torch.allclose(p, p0 - lr * g, atol=1e-6)
    plain = copy.deepcopy(reference)  # one perturbation for the whole batch lands elsewhere
    build_update(cfg(rho=rho), plain, torch.optim.SGD(plain.parameters(), lr=lr))(plain, RecordingCE(), x, y, CTX)
    assert (flat(list(plain.parameters())) - flat(list(model.parameters()))).abs().max() > 1e-4


def test_m_sharpness_with_the_whole_batch_is_plain_sam():
    x, y = batch()
    models = [tiny_model(), tiny_model()]
    for model, m in zip(models, (None, len(y))):
        config = cfg(rho=0.2)
        config.method.sam_m = m
        build_update(config, model, torch.optim.SGD(model.parameters(), lr=0.1))(model, RecordingCE(), x, y, CTX)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_m_sharpness_values_name_the_key(compose_cfg):
    from runner.errors import ConfigError
    from runner.validation import check_run

    with pytest.raises(ConfigError, match="method.sam_m"):
        check_run(compose_cfg("+method=sam", "method.sam_m=0"))
    with pytest.raises(ConfigError, match="method.sam_m.*SAM is off"):
        check_run(compose_cfg("+method=at", "method.sam_m=32"))
    check_run(compose_cfg("+method=sam", "method.sam_m=32"))
