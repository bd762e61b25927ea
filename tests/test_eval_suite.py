"""The evaluation suite: AutoAttack equals the official package run directly, sanity checks catch a
gradient-masked model and pass an honest adversarially trained one, curves, calibration, per-class
accuracy, suites and the report."""

import json
import math

import pytest
import torch
from torch import nn

from runner import load_dataset
from runner.attacks import pgd
from runner.evaluate import build_evaluators, evaluate
from runner.evaluators import autoattack, calibration, per_class, sanity
from runner.evaluators import pgd as pgd_evaluator
from runner.evaluators.base import EvalContext
from runner.layers import Normalize

EPS = 0.1


class Quantize(nn.Module):
    """Input quantisation: piecewise constant, so every input gradient is exactly zero (masking)."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class AlwaysDropout(nn.Module):
    """A randomised defence: noise at every forward pass, eval mode included."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.3, training=True)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        Normalize((0.305,), (0.38,)), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def honest_model():
    """A small MLP briefly trained with PGD adversarial training (Madry et al.) on digits."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 128):
            xb, yb = x[order[i : i + 128]], y[order[i : i + 128]]
            model.eval()
            x_adv = pgd(model, xb, yb, eps=EPS, steps=5, generator=generator)
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def context(run_dir=None, **overrides) -> EvalContext:
    values = {"norm": "linf", "eps": EPS, "device": torch.device("cpu"), "seed": 0, "batch_size": 500}
    return EvalContext(**{**values, **overrides}, run_dir=run_dir)


def run_suite(model, x, y, specs, ctx):
    """What evaluate() does per evaluator, without a config: results accumulate in the context."""
    results = []
    for spec in specs:
        module = __import__(f"runner.evaluators.{spec['name']}", fromlist=["build"])
        result = module.build(spec, None)(model, x, y, ctx)
        ctx.per_example.update(result.per_example)
        ctx.metrics.update(result.metrics)
        results.append(result)
    return results


SANITY_SUITE = [
    {"name": "clean"},
    {"name": "pgd", "steps": 20, "eps_factors": [0.5, 2]},
    {"name": "sanity", "n_examples": 100, "square_queries": 300},
]


def sanity_checks(model, digits):
    x, y = digits
    results = run_suite(model, x[:150], y[:150], SANITY_SUITE, context())
    return results[-1].checks, results


def test_honest_at_model_passes_every_sanity_check(honest_model, digits):
    checks, results = sanity_checks(honest_model, digits)
    assert len(checks) >= 9
    failed = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    assert not failed, failed
    assert results[1].metrics["pgd/acc"] > 0.3  # the AT model is robust, so the checks are not vacuous


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z * self.factor


def test_every_pgd_evaluation_flags_robust_points_it_could_not_move(honest_model, digits):
    """Logits x 1e4 predict exactly as the honest model does, but the cross-entropy gradient underflows to
    zero at confident points: PGD cannot move them and would count them robust. The default suite's own
    PGD says so, without the sanity evaluator; the margin loss, which does not saturate, measures them."""
    x, y = digits
    saturated = nn.Sequential(*honest_model, Scale(1e4)).eval()
    (honest,) = run_suite(honest_model, x[:150], y[:150], [{"name": "pgd", "steps": 20}], context())
    assert honest.checks[0]["passed"] and honest.settings["pgd/acc"]["robust_with_zero_gradient"] == 0
    (fooled,) = run_suite(saturated, x[:150], y[:150], [{"name": "pgd", "steps": 20}], context())
    assert not fooled.checks[0]["passed"] and "all-zero ce input gradient" in fooled.checks[0]["detail"]
    assert fooled.settings["pgd/acc"]["robust_with_zero_gradient"] > 0
    assert fooled.metrics["pgd/acc"] > honest.metrics["pgd/acc"]  # the inflated number the check flags
    (margin,) = run_suite(saturated, x[:150], y[:150], [{"name": "pgd", "steps": 20, "loss": "margin"}], context())
    assert margin.checks[0]["passed"] and margin.metrics["pgd/acc"] <= honest.metrics["pgd/acc"] + 0.02
    # At eps 0 nothing is attacked: no point there is "stuck".
    (unattacked,) = run_suite(saturated, x[:150], y[:150], [{"name": "pgd", "norm": "l2", "eps": [0]}], context())
    assert "pgd/l2/eps_0/acc" in unattacked.metrics and unattacked.checks == []


def test_robust_below_clean_compares_the_points_both_evaluated():
    clean = torch.tensor([True, True, False, True])
    subset_of_robust = {"clean": clean, "autoattack": torch.tensor([True, True])}  # 100% on its first 2 points
    assert sanity.robust_below_clean(subset_of_robust)["passed"]
    wrong = {"clean": clean, "pgd": torch.tensor([True, False, True, False])}  # point 2 is misclassified
    check = sanity.robust_below_clean(wrong)
    assert not check["passed"] and "pgd: 1 of 4" in check["detail"]


def test_gradient_masked_model_is_flagged(honest_model, digits):
    masked = nn.Sequential(Quantize(4), *honest_model).eval()
    checks, results = sanity_checks(masked, digits)
    failed = {c["name"] for c in checks if not c["passed"]}
    assert "sanity: input gradients are non-zero and finite" in failed
    assert "sanity: robust accuracy ≈ 0 at a very large eps" in failed
    # Masking makes PGD report *more* robustness than the honest model has: the trap the checks catch.
    assert results[1].metrics["pgd/acc"] > sanity_checks(honest_model, digits)[1][1].metrics["pgd/acc"]


def test_randomised_forward_pass_is_flagged(honest_model, digits):
    x, y = digits
    noisy = nn.Sequential(*honest_model[:3], AlwaysDropout(), *honest_model[3:]).eval()
    check = sanity.randomness_check(noisy, x[:50], passes=3)
    assert not check["passed"], check["detail"]
    assert sanity.randomness_check(honest_model, x[:50], passes=3)["passed"]


def test_not_rising_is_paired_and_tolerates_noise():
    weaker = torch.ones(80, dtype=torch.bool)
    weaker[40:] = False
    stronger = weaker.clone()
    stronger[:20] = False  # the stronger attack breaks 20 more points
    assert sanity.not_rising("steps", weaker, stronger, "weak", "strong")["passed"]
    rising = sanity.not_rising("steps", stronger, weaker, "weak", "strong")  # reversed: accuracy rises by 20
    assert not rising["passed"] and "rise 20 points" in rising["detail"]
    noisy = stronger.clone()
    noisy[4] = True  # one point the other way: within noise
    assert sanity.not_rising("steps", stronger, noisy, "a", "b")["passed"]
    assert not sanity.not_rising("restarts", stronger, noisy, "a", "b", exact=True)["passed"]


def test_eps_curve_checks_use_the_pgd_masks():
    base = torch.ones(100, dtype=torch.bool)
    small, threat, large = base.clone(), base.clone(), base.clone()
    threat[:30] = False
    large[:60] = False
    masks = {"clean": base, "pgd/eps_0.05": small, "pgd": threat, "pgd/eps_0.2": large}
    curves = sanity.curve_masks(masks, "linf", 0.1)
    assert [eps for eps, _ in curves["linf"]] == [0.05, 0.1, 0.2]
    assert all(c["passed"] for c in sanity.curve_checks(curves, "test"))
    masks["pgd/eps_0.2"] = base  # accuracy back to 1 at the largest eps: a broken curve
    (failed,) = sanity.curve_checks(sanity.curve_masks(masks, "linf", 0.1), "test")
    assert not failed["passed"] and "FAILED" in failed["detail"]


def test_pgd_curve_keys_restarts_and_l2(honest_model, digits):
    x, y = digits
    x, y = x[:80], y[:80]
    ctx = context()
    clean = run_suite(honest_model, x, y, [{"name": "clean"}], ctx)[0]
    spec = {"name": "pgd", "steps": 10, "eps": ["8/255", 0.05], "eps_factors": [2]}
    result = pgd_evaluator.build(spec, None)(honest_model, x, y, ctx)
    assert set(result.metrics) == {"pgd/eps_0.0313725/acc", "pgd/eps_0.05/acc", "pgd/acc", "pgd/eps_0.2/acc"}
    assert result.settings["pgd/eps_0.0313725/acc"]["eps_255"] == 8.0
    assert (result.per_example["pgd"] <= clean.per_example["clean"]).all()  # robust needs clean-correct
    single = pgd_evaluator.build({"name": "pgd", "steps": 10}, None)(honest_model, x, y, ctx)
    restarted = pgd_evaluator.build({"name": "pgd", "steps": 10, "restarts": 3}, None)(
        honest_model, x, y, ctx
    )
    assert (restarted.per_example["pgd"] <= single.per_example["pgd"]).all()  # per-example worst case
    l2 = pgd_evaluator.build({"name": "pgd", "steps": 10, "norm": "l2", "eps": [0.5, 1.0]}, None)
    result = l2(honest_model, x, y, ctx)
    assert set(result.metrics) == {"pgd/l2/eps_0.5/acc", "pgd/l2/eps_1/acc"}
    assert result.metrics["pgd/l2/eps_1/acc"] <= result.metrics["pgd/l2/eps_0.5/acc"] + 0.05


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "pgd", "stepz": 3}, "unknown keys"),
        ({"name": "pgd", "eps": "eight/255"}, "pgd.eps"),
        ({"name": "pgd", "steps": 0}, "pgd.steps"),
        ({"name": "autoattack", "version": "fast"}, "autoattack.version"),
        ({"name": "calibration", "bins": -1}, "calibration.bins"),
        ({"name": "sanity", "large_eps_max_acc": 2}, "sanity.large_eps_max_acc"),
    ],
)
def test_bad_specs_name_the_key(spec, message):
    module = __import__(f"runner.evaluators.{spec['name']}", fromlist=["build"])
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        module.build(spec, None)


def test_skip_fooled_by_needs_an_earlier_evaluator_and_uses_its_mask():
    evaluator = autoattack.build({"name": "autoattack", "skip_fooled_by": ["pgd"]}, None)
    with pytest.raises(ValueError, match="skip_fooled_by"):
        evaluator.skip_mask(context(), "autoattack/acc", 4)
    ctx = context()
    ctx.per_example["pgd"] = torch.tensor([True, False, True, False])
    skip, used = evaluator.skip_mask(ctx, "autoattack/acc", 4)
    assert used == ["pgd"] and skip.tolist() == [False, True, False, True]


# ---- AutoAttack: the number equals the official package run directly -------------------------------

AA_POINTS, AA_BATCH = 24, 10  # several batches per attack, so the batch partition is exercised


def direct_autoattack(model, x, y) -> torch.Tensor:
    from pyautoattack import AutoAttack

    attack = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=AA_BATCH)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


class Interrupted(Exception):
    pass


def test_autoattack_equals_direct_run_and_resumes(honest_model, digits, tmp_path, monkeypatch):
    from pyautoattack import AutoAttack

    x, y = digits
    x, y = x[:AA_POINTS], y[:AA_POINTS]
    expected = direct_autoattack(honest_model, x, y)

    evaluator = autoattack.build({"name": "autoattack", "batch_size": AA_BATCH}, None)
    original = AutoAttack.run_standard_evaluation
    calls = []

    def interrupt_third_call(self, *args, **kwargs):
        calls.append(list(self.attacks_to_run))
        if len(calls) == 3:
            raise Interrupted
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", interrupt_third_call)
    ctx = context(run_dir=tmp_path)
    with pytest.raises(Interrupted):
        evaluator(honest_model, x, y, ctx)
    state_files = list((tmp_path / "autoattack").glob("*.json"))
    assert len(state_files) == 1

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", original)
    result = evaluator(honest_model, x, y, ctx)  # resumes after the two finished batches
    settings = result.settings["autoattack/acc"]
    assert settings["resumed"] and settings["equals_direct_run"]
    assert torch.equal(result.per_example["autoattack"], expected)
    assert result.metrics["autoattack/acc"] == pytest.approx(expected.float().mean().item())
    assert 0 < result.metrics["autoattack/acc"] < 1  # some points robust, some broken: not vacuous
    assert sum(settings["fooled_by"].values()) == int(settings["points_attacked"] - expected.sum())
    assert result.metrics["autoattack/after_square/acc"] == pytest.approx(result.metrics["autoattack/acc"])
    assert all(c["passed"] for c in result.checks), result.checks

    def must_not_attack(self, *args, **kwargs):
        raise AssertionError("a completed evaluation must be read back, not recomputed")

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", must_not_attack)
    again = evaluator(honest_model, x, y, ctx)
    assert torch.equal(again.per_example["autoattack"], expected)


# ---- calibration and per-class accuracy ------------------------------------------------------------


def brute_force_ece(confidence, correct, bins):
    total = 0.0
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        members = [
            (c, k)
            for c, k in zip(confidence.tolist(), correct.tolist())
            if (low < c <= high) or (i == 0 and c == 0)
        ]
        if members:
            accuracy = sum(k for _, k in members) / len(members)
            mean_confidence = sum(c for c, _ in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


def test_ece_matches_brute_force_and_bin_edges():
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(500, generator=generator, dtype=torch.float64) * 0.9 + 0.1
    correct = torch.rand(500, generator=generator, dtype=torch.float64) < confidence
    ece = calibration.expected_calibration_error(confidence, correct, 15)
    assert ece == pytest.approx(brute_force_ece(confidence, correct, 15), abs=1e-12)
    # A perfectly calibrated bin contributes nothing; edges belong to the lower bin: (lo, hi].
    stats = calibration.bin_statistics(
        torch.tensor([1 / 15, 1.0, 0.5], dtype=torch.float64), torch.tensor([False, True, True]), 15
    )
    assert stats["count"][0] == 1 and stats["count"][14] == 1 and stats["count"][7] == 1
    assert stats["ece"] == pytest.approx((1 / 15 + 0 + 0.5) / 3)


def calibrated_sample(seed: int, n: int = 300, overconfidence: float = 0.0):
    """Confidences uniform on [0.5, 1], each prediction correct with probability confidence −
    overconfidence: the true (population) binned ECE is exactly `overconfidence`."""
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    return confidence, torch.rand(n, generator=generator, dtype=torch.float64) < confidence - overconfidence


def test_calibration_ece_interval_contains_its_estimate_and_reaches_zero_for_calibrated_models():
    """The binned ECE is biased upwards, so a percentile bootstrap sat above it: on these 60 perfectly
    calibrated samples it excluded the true ECE 0 every time and its own estimate 6 times. The basic
    bootstrap reflects the resamples around the estimate; with a true ECE of 0.1 it must still cover it."""
    seeds = range(60)
    contains_estimate = contains_zero = covers_miscalibrated = 0
    for seed in seeds:
        confidence, correct = calibrated_sample(seed)
        ece = calibration.expected_calibration_error(confidence, correct, 15)
        low, high = calibration.bootstrap_interval(confidence, correct, 15, 100, seed)
        contains_estimate += low <= ece <= high
        contains_zero += low == 0.0
        confidence, correct = calibrated_sample(seed, overconfidence=0.1)
        low, high = calibration.bootstrap_interval(confidence, correct, 15, 100, seed)
        covers_miscalibrated += low <= 0.1 <= high
    assert contains_estimate == len(seeds)
    assert contains_zero >= 0.5 * len(seeds), contains_zero
    assert covers_miscalibrated >= 0.8 * len(seeds), covers_miscalibrated


def test_calibration_without_bootstrap_reports_no_interval(tmp_path):
    """bootstrap: 0 resamples nothing: no interval (not [0, 1] presented as one), method "none"."""
    x, y = load_dataset("digits", "test")
    model = mlp().eval()
    result = calibration.build({"name": "calibration", "bootstrap": 0, "adversarial": False}, None)(
        model, x[:50], y[:50], context(tmp_path)
    )
    settings = result.settings["calibration/ece"]
    assert settings["ci95"] is None and settings["ci95_method"] == "none"
    assert (tmp_path / settings["plot"]).is_file()  # the diagram is drawn without an interval
    assert calibration.bootstrap_interval(torch.tensor([0.9]), torch.tensor([True]), 15, 100, 0) is None
    with_bootstrap = calibration.build({"name": "calibration", "bootstrap": 30, "adversarial": False}, None)
    settings = with_bootstrap(model, x[:50], y[:50], context()).settings["calibration/ece"]
    assert settings["ci95_method"].startswith("basic (reverse-percentile) bootstrap over examples (30 resamples)")


def test_per_class_and_worst_class():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    clean = torch.tensor([True, True, True, False, True, False])
    robust = torch.tensor([True, False, False, False, True, False])
    ctx = context()
    ctx.per_example.update({"clean": clean, "pgd": robust})
    result = per_class.build({"name": "per_class"}, None)(None, torch.zeros(6, 1, 2, 2), y, ctx)
    assert result.metrics["class/1/acc"] == pytest.approx(2 / 3)
    assert result.metrics["class/worst_acc"] == 0.0 and result.settings["class/worst_acc"]["class"] == 2
    assert result.metrics["class/0/robust_acc"] == 0.5
    assert result.metrics["class/robust_worst_acc"] == 0.0
    assert result.settings["class/1/acc"]["n_examples"] == 3
    assert "pgd" in result.settings["class/robust_worst_acc"]["robust_source"]


# ---- suites, settings, report ------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ["quick", "standard", "full"])
def test_suites_compose_and_build(compose_cfg, suite):
    cfg = compose_cfg(f"eval={suite}")
    names = [e.name for e in build_evaluators(cfg)]
    assert names[0] == "clean"
    if suite != "quick":
        assert "autoattack" in names
    if suite == "full":
        expected = {"pgd", "autoattack", "certified", "corruptions", "calibration", "per_class", "sanity"}
        assert expected <= set(names) and names[-1] == "sanity"


def test_evaluate_records_settings_intervals_checks_and_report(compose_cfg, honest_model, tmp_path):
    cfg = compose_cfg(
        "eval=quick",
        "eval.n_examples=60",
        "eval.evaluators=[{name: clean}, {name: pgd, steps: 10, eps_factors: [0.5, 2]}, "
        "{name: calibration, steps: 5, bootstrap: 20}, {name: per_class}, "
        "{name: sanity, n_examples: 40, square_queries: 100}]",
    )
    x, y = load_dataset("digits", "test")
    out = evaluate(honest_model, cfg, x, y, torch.device("cpu"), tmp_path)
    for key in ("clean/acc", "pgd/acc", "calibration/ece", "class/worst_acc", "class/robust_worst_acc"):
        assert key in out["metrics"], key
    for key, value in out["metrics"].items():
        settings = out["eval"][key]
        if key.endswith("acc"):
            low, high = settings["ci95"]
            assert low <= value <= high and settings["n_examples"] > 0 and "examples" in settings
    assert out["eval"]["pgd/acc"]["n_examples"] == 60 and out["eval"]["pgd/acc"]["eps_255"] == 25.5
    assert all(c["passed"] for c in out["checks"]), [c for c in out["checks"] if not c["passed"]]
    report = (tmp_path / "report.md").read_text()
    assert "`pgd/eps_0.05/acc`" in report and "`calibration/ece`" in report and "## Checks" in report
    assert "sanity: robust accuracy ≈ 0 at a very large eps" in report
    for plot in ("robustness_curve.png", "reliability.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in report
    # Every per-point result, in the split's order: each accuracy is its mean.
    saved = json.loads((tmp_path / "per_example.json").read_text())
    assert saved["n"]["clean"] == saved["n"]["pgd"] == 60 and "first 60" in saved["examples"]
    for name, key in (("clean", "clean/acc"), ("pgd", "pgd/acc"), ("pgd/eps_0.05", "pgd/eps_0.05/acc")):
        bits = [c == "1" for c in saved["points"][name]]
        assert sum(bits) / len(bits) == pytest.approx(out["metrics"][key])


def test_wilson_interval_brackets_the_estimate():
    from runner.evaluate import wilson_interval

    low, high = wilson_interval(0.9, 100)
    assert low < 0.9 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 100), rel=0.15)
    assert wilson_interval(1.0, 50)[1] == 1.0 and wilson_interval(0.0, 50)[0] == 0.0


def test_order_checks_compare_the_common_prefix():
    from runner.evaluate import order_checks

    per_example = {
        "clean": torch.tensor([True, True, False, True]),
        "autoattack": torch.tensor([True, False]),  # evaluated on the first two points only
        "pgd": torch.tensor([True, False, True, False]),  # a point robust but misclassified: a bug
    }
    checks = {c["name"]: c for c in order_checks(per_example)}
    assert checks["autoattack <= clean per point"]["passed"]
    assert "of 2 points" in checks["autoattack <= clean per point"]["detail"]
    assert not checks["pgd <= clean per point"]["passed"]


# ---- restarts that provably matter, and evaluation in eval mode --------------------------------------


def two_optima_model() -> nn.Sequential:
    """A 1-pixel model whose margin z_0 − z_1 over x ∈ [0.1, 0.9] (x = 0.5, eps 0.4) has two local minima:
    m(x) = 1 − (5/6)·relu(0.7 − x) − 10·relu(x − 0.7), so m(0.1) = 0.5 (still correct) and m(0.9) = −1
    (fooled), with the ridge at x = 0.7. PGD climbs the side it starts on: a uniform start finds the
    fooling optimum with probability 1/4, and only restarts make up for that."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model[0].bias.copy_(torch.tensor([0.7, -0.7]))
        model[2].weight.copy_(torch.tensor([[-5 / 6, -10.0], [0.0, 0.0]]))
        model[2].bias.copy_(torch.tensor([1.0, 0.0]))
    return model.eval()


def test_pgd_evaluator_restarts_keep_the_best_of_independent_restarts():
    model, eps, restarts = two_optima_model(), 0.4, 4
    x, y = torch.full((200, 1), 0.5), torch.zeros(200, dtype=torch.long)
    ctx = context(eps=eps, seed=3, batch_size=500)
    single = pgd_evaluator.build({"name": "pgd", "steps": 10}, None)(model, x, y, ctx)
    restarted = pgd_evaluator.build({"name": "pgd", "steps": 10, "restarts": restarts}, None)(model, x, y, ctx)
    # The same stream, one restart at a time: each run of pgd draws its start from the evaluator's generator.
    generator = torch.Generator().manual_seed(3)
    candidates = [pgd(model, x, y, eps=eps, steps=10, generator=generator) for _ in range(restarts)]
    with torch.no_grad():
        fooled = [model(candidate).argmax(1) != y for candidate in candidates]
    assert torch.equal(single.per_example["pgd"], ~fooled[0])
    assert torch.equal(restarted.per_example["pgd"], ~torch.stack(fooled).any(0))
    assert restarted.settings["pgd/acc"]["restarts"] == restarts
    # restarts matter here: about 3/4 survive one restart, about (3/4)^4 ≈ 0.32 survive four
    assert 0.6 < single.metrics["pgd/acc"] < 0.9 and 0.15 < restarted.metrics["pgd/acc"] < 0.5


def bn_model() -> nn.Sequential:
    """BatchNorm whose running statistics are far from a batch's, so train and eval mode disagree."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
    )
    with torch.no_grad():
        model[3].running_mean.uniform_(-1.0, 1.0)
        model[3].running_var.uniform_(0.3, 3.0)
        model[3].weight.uniform_(0.5, 2.0)
        model[3].bias.uniform_(-0.5, 0.5)
    return model


def bn_batch(model, n=60):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # every point correct in eval mode
    return x, y


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pgd_evaluator_on_a_train_mode_model_gives_the_eval_mode_result_and_keeps_bn_statistics():
    import copy

    model = bn_model()
    x, y = bn_batch(model)
    reference = copy.deepcopy(model).eval()
    spec, ctx = {"name": "pgd", "steps": 10, "eps": 0.02}, context(eps=0.05)
    expected = pgd_evaluator.build(spec, None)(reference, x, y, ctx)
    model.train()
    before = bn_state(model)
    result = pgd_evaluator.build(spec, None)(model, x, y, context(eps=0.05))
    assert model.training  # the caller's mode is restored ...
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # ... and BN never updated
    for key in ("pgd", "pgd/eps_0.02"):
        assert torch.equal(result.per_example[key], expected.per_example[key]), key
    assert 0 < expected.metrics["pgd/acc"] < 1
    # not vacuous: in train mode (batch statistics) the same attack gives another answer
    with torch.no_grad():
        assert (model(x).argmax(1) != y).float().mean() > 0.2


def test_evaluate_puts_a_batch_norm_model_in_eval_mode(compose_cfg):
    """The suite (clean, pgd, certified) on a model handed over in train mode: the numbers are the eval-mode
    model's, and no evaluator moves BatchNorm's running statistics."""
    import copy

    from runner import bounds

    eps = 0.01
    cfg = compose_cfg(
        f"threat.eps={eps}",
        "eval.n_examples=null",
        "eval.evaluators=[{name: clean}, {name: pgd, steps: 10}, {name: certified, methods: [ibp], tightness: false}]",
    )
    model = bn_model()
    x, y = bn_batch(model)
    reference = copy.deepcopy(model).eval()
    model.train()
    before = bn_state(model)
    out = evaluate(model, cfg, x, y, torch.device("cpu"), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["metrics"]["clean/acc"] == 1.0  # y is the eval-mode prediction
    expected_pgd = pgd_evaluator.pgd_correct(
        reference, x, y, eps=eps, norm="linf", steps=10, restarts=1, alpha=None, loss="ce",
        seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
    )
    assert out["metrics"]["pgd/acc"] == pytest.approx(expected_pgd.float().mean().item())
    lower = bounds.ibp_margin_bounds(reference, x, y, eps)
    assert out["metrics"]["certified/ibp/acc"] == pytest.approx(bounds.certified_mask(lower, y).float().mean().item())
    assert 0 < out["metrics"]["certified/acc"] < out["metrics"]["pgd/acc"] < 1  # not vacuous
    assert all(c["passed"] for c in out["checks"]), [c for c in out["checks"] if not c["passed"]]
    assert "certified <= pgd per point" in {c["name"] for c in out["checks"]}
