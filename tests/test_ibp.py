"""IBP / CROWN-IBP training methods (schedules, initialisation, loss) and the certified evaluator."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from runner import bounds
from runner.evaluators import certified
from runner.evaluators.base import EvalContext
from runner.layers import Normalize, Residual
from runner.methods import crown_ibp, ibp
from runner.methods.base import StepContext

EPS = 0.1
SPE = 10  # steps per epoch in the schedule tests


def run_cfg(module=ibp, log_every=1000, **method):
    """Shi et al.'s κ and eps_train = eps unless a test says otherwise (the YAML defaults are digits')."""
    method = {"kappa": "shi", "eps_factor": 1.0} | method
    return OmegaConf.create(
        {
            "method": OmegaConf.structured(module.Config(**method)),
            "threat": {"norm": "linf", "eps": EPS},
            "train": {"log_every": log_every},
        }
    )


def ctx(step, spe=SPE, eps=EPS):
    return StepContext(epoch=step // spe, step=step, steps_per_epoch=spe, total_steps=100 * spe, norm="linf", eps=eps)


def tiny_model(batch_norm=True, seed=0):
    torch.manual_seed(seed)
    layers = [Normalize([0.5], [0.3]), nn.Conv2d(1, 4, 3, stride=2, padding=1)]
    layers += [nn.BatchNorm2d(4)] if batch_norm else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(36, 12)]
    layers += [nn.BatchNorm1d(12)] if batch_norm else []
    layers += [nn.ReLU(), nn.Linear(12, 5)]
    return nn.Sequential(*layers)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


# ---- schedules ------------------------------------------------------------------------------------


def test_smooth_ramp_is_the_slope_continuous_polynomial_then_linear():
    f = ibp.smooth_ramp
    assert f(0.0) == 0.0 and math.isclose(f(1.0), 1.0)
    a = 1 / (0.25**4 + 4 * 0.25**3 * 0.75)
    for t in (0.05, 0.1, 0.2, 0.25):
        assert math.isclose(f(t), a * t**4)
    for t in (0.3, 0.6, 0.9):  # linear with the polynomial's slope at 25%
        assert math.isclose(f(t), a * 0.25**4 + 4 * a * 0.25**3 * (t - 0.25))
    h = 1e-6
    left, right = (f(0.25) - f(0.25 - h)) / h, (f(0.25 + h) - f(0.25)) / h
    assert math.isclose(left, right, rel_tol=1e-3)
    values = [f(i / 100) for i in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("ramp", ["smooth", "linear"])
def test_eps_schedule_warmup_ramp_and_plateau(ramp):
    m = run_cfg(warmup_epochs=2, ramp_epochs=5, ramp=ramp, eps_factor=1.1).method
    eps_train = 1.1 * EPS
    assert all(ibp.eps_at(step, SPE, m, eps_train) == 0.0 for step in range(20))  # 2 warm-up epochs
    for step in range(20, 70):
        fraction = (step - 20) / 50  # the 0-based batch index, as auto_LiRPA's SmoothedScheduler counts
        shaped = ibp.smooth_ramp(fraction) if ramp == "smooth" else fraction
        assert math.isclose(ibp.eps_at(step, SPE, m, eps_train), eps_train * shaped)
    assert ibp.eps_at(20, SPE, m, eps_train) == 0.0 and ibp.eps_at(69, SPE, m, eps_train) < eps_train
    assert all(ibp.eps_at(step, SPE, m, eps_train) == eps_train for step in range(70, 200))


def test_kappa_schedules():
    shi = run_cfg(kappa="shi", warmup_epochs=1, ramp_epochs=4).method
    assert ibp.kappa_at(3, SPE, shi, 0.0, EPS) == 1.0 and ibp.kappa_at(13, SPE, shi, 0.01, EPS) == 0.0
    gowal = run_cfg(kappa="gowal", kappa_start=1.0, kappa_end=0.5, warmup_epochs=1, ramp_epochs=4).method
    assert ibp.kappa_at(5, SPE, gowal, 0.0, EPS) == 1.0
    for step in range(10, 50):
        assert math.isclose(ibp.kappa_at(step, SPE, gowal, 0.05, EPS), 1.0 - 0.5 * (step - 10) / 40)
    assert ibp.kappa_at(80, SPE, gowal, EPS, EPS) == 0.5
    # CROWN-IBP's train.py: kappa = (max_eps - eps * (1 - final_kappa)) / max_eps, on the smoothed eps.
    follows_eps = run_cfg(kappa="eps", kappa_start=1.0, kappa_end=0.5, warmup_epochs=1, ramp_epochs=4).method
    for step in range(0, 60):
        eps_t = ibp.eps_at(step, SPE, follows_eps, EPS)
        assert math.isclose(ibp.kappa_at(step, SPE, follows_eps, eps_t, EPS), (EPS - eps_t * (1 - 0.5)) / EPS)
    mid_ramp = ibp.eps_at(19, SPE, follows_eps, EPS)  # a quarter of the ramp: eps is still small, kappa near 1
    assert ibp.kappa_at(19, SPE, follows_eps, mid_ramp, EPS) > ibp.kappa_at(19, SPE, gowal, mid_ramp, EPS) + 0.05


def test_crown_ibp_beta_follows_the_eps_ramp():
    method = crown_ibp.build(run_cfg(crown_ibp, beta_start=1.0, beta_end=0.0))
    assert method.beta(0.0, EPS) == 1.0 and method.beta(EPS, EPS) == 0.0
    assert math.isclose(method.beta(0.025, EPS), 0.75)


@pytest.mark.parametrize(
    ("key", "value"), [("ramp", "cosine"), ("kappa", "madry"), ("ramp_epochs", -1.0), ("reg_lambda", -0.1)]
)
def test_bad_method_keys_fail_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"method.{key}"):
        ibp.build(run_cfg(**{key: value}))


# ---- initialisation -------------------------------------------------------------------------------


def test_ibp_initialisation_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 30 * 30, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    last_before = model[-1].weight.clone()
    assert ibp.ibp_initialise(model) == 2
    for layer, fan_in in [(model[0], 27), (model[3], 64 * 30 * 30)]:
        expected = math.sqrt(2 * math.pi) / fan_in
        assert abs(layer.weight.std().item() / expected - 1) < 0.05
        assert abs(layer.weight.mean().item()) < 0.05 * expected
    assert torch.equal(model[-1].weight, last_before)  # the classifier keeps its initialisation


def test_setup_rejects_models_the_bounds_cannot_train():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(bounds.UnsupportedModel, match="Tanh"):
        ibp.build(run_cfg()).setup(model)
    residual = nn.Sequential(nn.Flatten(), Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), nn.Linear(4, 2))
    ibp.build(run_cfg(ibp_init=False)).setup(residual)  # IBP bounds residual nets
    with pytest.raises(bounds.UnsupportedModel, match="Residual"):
        crown_ibp.build(run_cfg(crown_ibp)).setup(residual)


# ---- the loss -------------------------------------------------------------------------------------


def test_warmup_loss_is_clean_cross_entropy():
    model, (x, y) = tiny_model().train(), batch()
    method = ibp.build(run_cfg(warmup_epochs=1, ramp_epochs=2, reg_lambda=0.0))
    loss, logs = method.loss(model, x, y, ctx(step=3))
    assert logs["eps_t"] == 0.0 and logs["kappa"] == 1.0 and "robust_loss" not in logs
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


def test_robust_loss_after_the_ramp_uses_clean_batch_statistics():
    model, (x, y) = tiny_model().train(), batch()
    method = ibp.build(run_cfg(warmup_epochs=1, ramp_epochs=2, reg_lambda=0.0))
    loss, logs = method.loss(model, x, y, ctx(step=40))
    assert logs["eps_t"] == EPS and logs["kappa"] == 0.0
    _, stats = bounds.forward_with_bn_stats(model, x)
    expected = bounds.robust_cross_entropy(bounds.ibp_margin_bounds(model, x, y, EPS, bn_stats=stats), y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.training


@pytest.mark.parametrize("batch_norm", [False, True])
def test_robust_only_loss_runs_the_clean_pass_only_for_batch_statistics(batch_norm):
    """After Shi's ramp the loss is robust CE alone: the clean forward pass is needed only where BatchNorm
    takes the clean batch's statistics, and skipping it elsewhere changes no gradient."""
    model, (x, y) = tiny_model(batch_norm=batch_norm).train(), batch()
    method = ibp.build(run_cfg(warmup_epochs=1, ramp_epochs=2, reg_lambda=0.0))
    calls = []
    model[1].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    loss, logs = method.loss(model, x, y, ctx(step=40))
    assert logs["kappa"] == 0.0 and len(calls) == (1 if batch_norm else 0)  # the bounds are not a forward call
    assert ("clean_loss" in logs) == batch_norm
    _, stats = bounds.forward_with_bn_stats(model, x)
    expected = bounds.robust_cross_entropy(bounds.ibp_margin_bounds(model, x, y, EPS, bn_stats=stats), y)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, expected_grads):
        assert (got is None and want is None) or torch.equal(got, want)


def test_gowal_loss_mixes_clean_and_robust_cross_entropy():
    model, (x, y) = tiny_model(batch_norm=False).train(), batch()
    method = ibp.build(run_cfg(kappa="gowal", warmup_epochs=0, ramp_epochs=0, reg_lambda=0.0, eps_factor=1.1))
    loss, logs = method.loss(model, x, y, ctx(step=0))
    assert logs["kappa"] == 0.5 and math.isclose(logs["eps_t"], 1.1 * EPS)
    robust = bounds.robust_cross_entropy(bounds.ibp_margin_bounds(model, x, y, 1.1 * EPS), y)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(model(x), y) + 0.5 * robust)


@pytest.mark.parametrize("eps_factor", [1.0, 1.5])
def test_warmup_regulariser_is_added_during_the_ramp_and_vanishes_after(eps_factor):
    model, (x, y) = tiny_model().train(), batch()
    with_reg = ibp.build(run_cfg(warmup_epochs=1, ramp_epochs=4, reg_lambda=0.5, eps_factor=eps_factor))
    without = ibp.build(run_cfg(warmup_epochs=1, ramp_epochs=4, reg_lambda=0.0, eps_factor=eps_factor))
    for step in (0, 20):  # warm-up (reg at a tiny eps) and mid-ramp
        loss, logs = with_reg.loss(model, x, y, ctx(step))
        plain, _ = without.loss(model, x, y, ctx(step))
        weight = 0.5 * (1 - logs["eps_t"] / (eps_factor * EPS))  # lambda (1 - eps_t / eps_train)
        torch.testing.assert_close(loss, plain + weight * logs["reg_loss"])
        assert logs["reg_loss"] > 0
    _, logs = with_reg.loss(model, x, y, ctx(60))
    assert "reg_loss" not in logs


def test_regulariser_terms():
    # Intervals that keep their width and balanced ReLU states cost nothing.
    centre = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    radius = torch.full_like(centre, 0.5)
    assert ibp.warmup_regulariser(radius, [(centre, radius)], tol=0.5).item() == 0.0
    # Intervals 10x wider than the input's: L_tightness = (0.5 - 0.1) / 0.5 = 0.8.
    reg = ibp.warmup_regulariser(radius / 10, [(centre, radius)], tol=0.5)
    assert math.isclose(reg.item(), 0.8, rel_tol=1e-6)


def test_relu_balance_term_closed_form():
    narrow = torch.full((1, 4), 0.01)  # every neuron stable; the tightness term is 0 (r_i = r_0)
    # One active neuron at 1, three inactive at -0.1: mean ratio 0.25 / 0.075 -> min(10/3, 0.3) = 0.3;
    # centre mean 0.175, variance ratio 0.825² / (3 · 0.275²) = 3 -> 1/3. (0.2 + 1/6) / 0.5 = 11/15.
    unbalanced = torch.tensor([[1.0, -0.1, -0.1, -0.1]])
    reg = ibp.warmup_regulariser(narrow, [(unbalanced, narrow)], tol=0.5)
    assert math.isclose(reg.item(), 11 / 15, rel_tol=1e-5)
    # All neurons dead: both ratios are 0, the full (0.5 + 0.5) / 0.5 = 2 (Shi et al.'s reference adds it);
    # all active: the mean ratio divides by zero and the reference skips the layer, as here.
    dead, alive = torch.tensor([[-1.0, -0.5, -0.2, -2.0]]), torch.tensor([[1.0, 0.5, 0.2, 2.0]])
    assert ibp.warmup_regulariser(narrow, [(dead, narrow)], tol=0.5).item() == 2.0
    assert ibp.warmup_regulariser(narrow, [(alive, narrow)], tol=0.5).item() == 0.0
    # Averaged over the ReLU layers.
    both = ibp.warmup_regulariser(narrow, [(unbalanced, narrow), (dead, narrow)], tol=0.5)
    assert math.isclose(both.item(), (11 / 15 + 2) / 2, rel_tol=1e-5)


def test_tightness_compares_with_the_input_box_after_the_models_normalisation():
    """r_0 is measured where the reference measures it, on normalised data: eps / std wide, not eps."""
    model, (x, y) = tiny_model(batch_norm=False).train(), batch()  # Normalize([0.5], [0.3]) first
    box = bounds.input_box(x, 0.05)
    torch.testing.assert_close(ibp.input_radius(model, box), box[1] / 0.3)
    torch.testing.assert_close(ibp.input_radius(model[1:], box), box[1])  # no Normalize: pixel units
    method = ibp.build(run_cfg(warmup_epochs=0, ramp_epochs=4, reg_lambda=0.5))
    _, logs = method.loss(model, x, y, ctx(10))  # mid-ramp: eps_t > 0
    relu_inputs = []
    bounds.ibp_margin_bounds(model, x, y, logs["eps_t"], relu_inputs=relu_inputs)
    box = bounds.input_box(x, logs["eps_t"])
    expected = ibp.warmup_regulariser(box[1] / 0.3, relu_inputs, tol=0.5)
    in_pixel_units = ibp.warmup_regulariser(box[1], relu_inputs, tol=0.5)
    assert not torch.isclose(expected, in_pixel_units)  # the test can tell the two apart
    torch.testing.assert_close(logs["reg_loss"], expected)


def test_crown_ibp_loss_at_full_beta_uses_the_crown_bound():
    model, (x, y) = tiny_model().train(), batch()
    method = crown_ibp.build(run_cfg(crown_ibp, warmup_epochs=0, ramp_epochs=0, reg_lambda=0.0, beta_end=1.0))
    loss, logs = method.loss(model, x, y, ctx(0))
    assert logs["beta"] == 1.0
    _, stats = bounds.forward_with_bn_stats(model, x)
    lower = bounds.crown_margin_bounds(model, x, y, EPS, bn_stats=stats, intermediate="ibp")
    torch.testing.assert_close(loss, bounds.robust_cross_entropy(lower, y))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_crown_ibp_loss_mixes_the_two_bounds_with_beta_along_the_ramp():
    model, (x, y) = tiny_model().train(), batch()
    method = crown_ibp.build(run_cfg(crown_ibp, warmup_epochs=0, ramp_epochs=2, ramp="linear", reg_lambda=0.0))
    loss, logs = method.loss(model, x, y, ctx(10))  # half-way: eps_t = eps / 2, beta 1 -> 0 gives 0.5
    assert math.isclose(logs["eps_t"], EPS / 2) and math.isclose(logs["beta"], 0.5)
    _, stats = bounds.forward_with_bn_stats(model, x)
    crown = bounds.crown_margin_bounds(model, x, y, EPS / 2, bn_stats=stats, intermediate="ibp")
    interval = bounds.ibp_margin_bounds(model, x, y, EPS / 2, bn_stats=stats)
    torch.testing.assert_close(loss, bounds.robust_cross_entropy(0.5 * crown + 0.5 * interval, y))


def test_tightness_is_logged_on_the_steps_the_tracker_records():
    model, (x, y) = tiny_model().train(), batch()
    method = ibp.build(run_cfg(log_every=5, warmup_epochs=0, ramp_epochs=1))
    assert "tightness" not in method.loss(model, x, y, ctx(3))[1]
    tightness = method.loss(model, x, y, ctx(4))[1]["tightness"]
    assert 0 < tightness <= 1


def test_validate_selects_on_ibp_certified_accuracy():
    model, (x, y) = tiny_model().eval(), batch(n=40)
    method = ibp.build(run_cfg(val_batch_size=16))
    assert method.select_on == "certified"
    metrics = method.validate(model, x, y, ctx(0))
    certified_acc = bounds.certified_mask(bounds.ibp_margin_bounds(model, x, y, EPS), y).float().mean().item()
    assert metrics["val/score"] == metrics["val/ibp_cert_acc"] == pytest.approx(certified_acc)
    assert metrics["val/clean_acc"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())


# ---- the certified evaluator ----------------------------------------------------------------------


def eval_ctx(eps=EPS, **per_example):
    return EvalContext(
        norm="linf",
        eps=eps,
        device=torch.device("cpu"),
        seed=0,
        batch_size=16,
        run_dir=None,
        per_example=per_example,
    )


def robust_model():
    """A model with large margins around its inputs, so that something gets certified."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5))
    return model.eval()


def test_certified_evaluator_reports_every_method_and_their_union():
    model = robust_model()
    x, _ = batch(n=30)
    y = model(x).argmax(1)
    result = certified.build({"name": "certified"}, None)(model, x, y, eval_ctx(eps=0.002))
    masks = {m: result.per_example[f"certified_{m}"] for m in bounds.METHODS}
    for method, mask in masks.items():
        assert result.metrics[f"certified/{method}/acc"] == pytest.approx(mask.float().mean().item())
        settings = result.settings[f"certified/{method}/acc"]
        assert settings["n_examples"] == 30 and settings["time_s"] >= 0 and settings["eps"] == 0.002
    union = masks["ibp"] | masks["crown_ibp"] | masks["crown"]
    assert torch.equal(result.per_example["certified"], union) and union.any()
    assert result.metrics["certified/acc"] == pytest.approx(union.float().mean().item())
    assert all(check["passed"] for check in result.checks)
    # A larger eps never certifies more.
    wide = certified.build({"name": "certified"}, None)(model, x, y, eval_ctx(eps=0.05))
    assert (wide.per_example["certified"] <= result.per_example["certified"]).all()


def test_certified_evaluator_reports_unsupported_methods():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), Residual(nn.Sequential(nn.Linear(36, 36), nn.ReLU())), nn.Linear(36, 5))
    x, y = batch()
    result = certified.build({"name": "certified"}, None)(model.eval(), x, y, eval_ctx())
    assert "certified/ibp/acc" in result.metrics and "certified/crown/acc" not in result.metrics
    unsupported = result.settings["certified/acc"]["unsupported"]
    assert set(unsupported) == {"crown_ibp", "crown"} and "Residual" in unsupported["crown"]
    assert {c["name"] for c in result.checks if c.get("skipped")} >= {
        "certified/crown applicable",
        "certified/crown_ibp applicable",
    }
    too_wide = certified.build({"name": "certified", "crown_max_neurons": 10}, None)
    result = too_wide(robust_model(), x, y, eval_ctx())
    assert "crown_max_neurons" in result.settings["certified/acc"]["unsupported"]["crown"]
    l2_run = OmegaConf.create({"threat": {"norm": "l2", "eps": 0.5}})
    ok, reason = certified.build({"name": "certified"}, l2_run).supports(robust_model())
    assert not ok and "l2" in reason
    with pytest.raises(ValueError, match="unknown keys"):
        certified.build({"name": "certified", "stepz": 3}, None)
    with pytest.raises(ValueError, match="methods"):
        certified.build({"name": "certified", "methods": ["deeppoly"]}, None)


def test_certified_evaluator_flags_a_certified_point_that_is_misclassified():
    model = robust_model()
    x, _ = batch(n=30)
    y = model(x).argmax(1)
    wrong_clean = torch.zeros(30, dtype=torch.bool)  # a (deliberately false) clean result from earlier
    result = certified.build({"name": "certified"}, None)(model, x, y, eval_ctx(eps=0.002, clean=wrong_clean))
    check = next(c for c in result.checks if c["name"] == "certified <= clean per point")
    assert not check["passed"]


# ---- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
def test_certified_training_run_end_to_end(compose_cfg, tmp_path, method):
    from runner.train import run

    overrides = [
        f"+method={method}",
        "eval=certified",
        "train.epochs=2",
        "method.warmup_epochs=0",
        "method.ramp_epochs=1",
        "train.progress=plain",
        "train.log_every=5",
        "eval.n_examples=40",
        "optimizer=adam",
        "optimizer.lr=5e-3",
        "train.grad_clip=10",
    ]
    results = run(compose_cfg(*overrides), tmp_path)
    metrics = results["metrics"]
    assert results["run"]["method"] == method
    for key in ("certified/ibp/acc", "certified/crown_ibp/acc", "certified/crown/acc", "certified/acc"):
        assert 0 <= metrics[key] <= metrics["certified/acc"] <= metrics["clean/acc"]
        assert results["eval"][key]["n_examples"] == 40
    assert all(check["passed"] for check in results["checks"]), results["checks"]
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eps_t"' in line]
    assert rows and '"tightness"' in rows[-1]
    assert results["train"]["warnings"] == []  # the ramp ends within the run


def test_a_run_shorter_than_the_eps_ramp_says_so(compose_cfg, tmp_path):
    """warmup 3 + ramp 40 epochs in a 2-epoch run: the model never trains near eps_train."""
    from runner.methods import build_method
    from runner.train import run

    cfg = compose_cfg("+method=ibp", "train.epochs=2", "eval=none", "train.progress=plain")
    (warning,) = build_method(cfg).schedule_warnings(steps_per_epoch=10, epochs=2)
    assert "ends after epoch 43" in warning and "trains at eps 0," in warning  # still in the eps = 0 warm-up
    cfg = compose_cfg("+method=ibp", "train.epochs=4", "method.warmup_epochs=1", "method.ramp_epochs=4",
                      "eval=none", "train.progress=plain", "train.batch_size=256")
    (warning,) = build_method(cfg).schedule_warnings(steps_per_epoch=10, epochs=4)
    fraction = float(warning.split("% of eps_train")[0].rsplit(" ", 1)[-1])
    assert 0 < fraction < 100 and "ends after epoch 5" in warning
    results = run(cfg, tmp_path)
    assert len(results["train"]["warnings"]) == 1 and "eps ramp ends after epoch 5" in results["train"]["warnings"][0]
    assert "WARNING" in (tmp_path / "train.log").read_text()
    # Ending on the ramp's last batch (one step short of eps_train, as in the references) is a finished ramp.
    short = compose_cfg("+method=ibp", "method.warmup_epochs=1", "method.ramp_epochs=1")
    assert build_method(short).schedule_warnings(steps_per_epoch=10, epochs=2) == []
    assert len(build_method(short).schedule_warnings(steps_per_epoch=10, epochs=1)) == 1


# ---- the certified evaluator certifies at threat.eps, and sits under PGD per point ---------------------

CERT_EPS = 0.01  # robust_model certifies about half of the points here, and all of them at 0 or eps/255


def direct_masks(model, x, y, eps):
    return {m: bounds.certified_mask(bounds.margin_lower_bounds(model, x, y, eps, method=m), y) for m in bounds.METHODS}


def test_certified_evaluator_certifies_at_threat_eps():
    model = robust_model()
    x, _ = batch(n=30)
    y = model(x).argmax(1)
    result = certified.build({"name": "certified"}, None)(model, x, y, eval_ctx(eps=CERT_EPS))
    expected = direct_masks(model, x, y, CERT_EPS)
    expected_ibp = bounds.certified_mask(bounds.ibp_margin_bounds(model, x, y, CERT_EPS), y)
    assert torch.equal(expected["ibp"], expected_ibp)
    for method, mask in expected.items():
        assert torch.equal(result.per_example[f"certified_{method}"], mask), method
        assert result.metrics[f"certified/{method}/acc"] == pytest.approx(mask.float().mean().item())
        assert result.settings[f"certified/{method}/acc"]["eps"] == CERT_EPS
    union = expected["ibp"] | expected["crown_ibp"] | expected["crown"]
    assert torch.equal(result.per_example["certified"], union)
    assert result.metrics["certified/acc"] == pytest.approx(union.float().mean().item())
    # The check above tells threat.eps apart from the wrong units: at 0 and at eps/255 every point is
    # certified by every method, at eps only some are.
    for wrong_eps in (0.0, CERT_EPS / 255):
        for method, mask in direct_masks(model, x, y, wrong_eps).items():
            assert mask.all() and not expected[method].all(), (wrong_eps, method)
    assert 0 < expected["ibp"].float().mean() < expected["crown"].float().mean() < 1


def test_certified_next_to_pgd_runs_the_certified_le_pgd_check(compose_cfg):
    """evaluate() with clean, pgd and certified: the per-point order check certified <= pgd is run and
    passes, with enough certified and enough PGD-broken points that it could fail."""
    from runner.evaluate import evaluate

    cfg = compose_cfg(
        f"threat.eps={CERT_EPS}",
        "eval.n_examples=null",
        "eval.evaluators=[{name: clean}, {name: pgd, steps: 20}, {name: certified, tightness: false}]",
    )
    model = robust_model()
    x, _ = batch(n=30)
    y = model(x).argmax(1)
    out = evaluate(model, cfg, x, y, torch.device("cpu"), None)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["certified <= pgd per point"]["passed"], checks["certified <= pgd per point"]
    assert "of 30 points" in checks["certified <= pgd per point"]["detail"]
    assert all(c["passed"] for c in out["checks"]), [c for c in out["checks"] if not c["passed"]]
    metrics = out["metrics"]
    assert 0 < metrics["certified/acc"] < metrics["pgd/acc"] < metrics["clean/acc"] == 1.0
    expected = direct_masks(model, x, y, CERT_EPS)
    assert metrics["certified/acc"] == pytest.approx((expected["ibp"] | expected["crown"]).float().mean().item())
    assert out["eval"]["certified/acc"]["eps"] == CERT_EPS
