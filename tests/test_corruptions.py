"""Regenerated common corruptions: range, shape, determinism, severity ordering, neutral constants,
agreement with the reference libraries' primitives, and the corruptions evaluator's keys and mCE."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from runner.corruptions import CORRUPTIONS, apply_level, corrupt, levels, ops, working_factor
from runner.corruptions.digital import brightness, jpeg_compression, pixelate
from runner.corruptions.rng import ImageStreams, hash32
from runner.evaluators.base import EvalContext
from runner.evaluators.corruptions import build
from runner.plots import write_corruption_plot

SIZES = ("8x8x1", "28x28x1", "32x32x3")
# Corruptions whose output does not depend on the seed (no random draws).
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}


def digits8(n: int) -> torch.Tensor:
    return torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16


def images(size: str, n: int = 16) -> torch.Tensor:
    """Natural-ish test images: digits (8x8), enlarged digits (28x28), smooth colour fields with a disc."""
    if size == "8x8x1":
        return digits8(n)
    if size == "28x28x1":
        return F.interpolate(digits8(n), size=28, mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 16) ** 2 + (xx - 16) ** 2) < 64).float()
    return (base.clamp(0, 1) * (1 - disc) + disc * torch.rand(n, 3, 1, 1, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def batches():
    return {size: images(size, 32) for size in SIZES}


@pytest.fixture(scope="module")
def corrupted(batches):
    """Every corruption at every severity of every test batch, seed 0, computed once."""
    return {
        (name, size, severity): corrupt(x, name, severity, seed=0)
        for name in CORRUPTIONS
        for size, x in batches.items()
        for severity in range(1, 6)
    }


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_keeps_shape_dtype_range_and_changes_the_image(name, batches, corrupted):
    for size, x in batches.items():
        for severity in range(1, 6):
            out = corrupted[name, size, severity]
            assert out.shape == x.shape and out.dtype == x.dtype, (name, size, severity)
            assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1, (name, size, severity)
            assert not torch.equal(out, x), f"{name} severity {severity} left {size} images unchanged"
    assert all(torch.equal(x, images(size, 32)) for size, x in batches.items()), "input modified in place"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_is_bit_identical_and_batch_composition_does_not_matter(name, batches, corrupted):
    for size, x in batches.items():
        full = corrupted[name, size, 3]
        assert torch.equal(corrupt(x, name, 3, seed=0), full)
        chunks = [corrupt(x[:5], name, 3, seed=0), corrupt(x[5:], name, 3, seed=0, first_index=5)]
        assert torch.equal(torch.cat(chunks), full)
        other_seed = corrupt(x, name, 3, seed=12)
        assert torch.equal(other_seed, full) == (name in DETERMINISTIC)


def mean_abs_change(x: torch.Tensor, out: torch.Tensor) -> float:
    return (out - x).abs().mean().item()


def one_minus_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


EXCEPTIONS = {"glass_blur", "elastic_transform", "frost", "pixelate"}  # each has its own test below


@pytest.mark.parametrize("name", sorted(set(CORRUPTIONS) - EXCEPTIONS))
def test_mean_change_does_not_fall_with_severity(name, batches, corrupted):
    """Mean |x_c - x| is non-decreasing in severity (ties allowed: motion blur 3 and 4 share sigma 2,
    so the reference's kernels differ only in taps of weight < 1%) and clearly larger at 5 than 1."""
    for size, x in batches.items():
        change = [mean_abs_change(x, corrupted[name, size, s]) for s in range(1, 6)]
        slack = 0.02 * change[-1]
        assert all(b >= a - slack for a, b in zip(change, change[1:])), (size, change)
        assert change[-1] > 1.25 * change[0], (size, change)


def test_glass_blur_two_passes_distort_more_than_one(batches, corrupted):
    """Documented exception: severities 1-3 make one swap pass, 4-5 two, with pre-blur sigma rising
    inside each group; more pre-blur makes swapped neighbours alike, so |x_c - x| may dip inside a
    group (it does in the reference). Every two-pass severity must beat every one-pass one."""
    for size, x in batches.items():
        change = [mean_abs_change(x, corrupted["glass_blur", size, s]) for s in range(1, 6)]
        assert min(change[3:]) > max(change[:3]), (size, change)


def reference_glass_blur(x, level, rng, scale):
    """make_cifar_c.py's glass_blur loop written out literally on an H×W×C numpy array per image, its
    `x[h, w], x[h', w'] = x[h', w'], x[h, w]` line included (a copy with numpy views, not a swap), with
    the random shifts taken from the same counter-based draws as `blur.glass_blur`."""
    sigma, max_shift, passes = level
    sigma, max_shift = sigma * scale, max(1, round(max_shift * scale))
    blurred = ops.gaussian_blur(x, sigma, truncate=4.0, mode="edge")
    height, width = x.shape[-2:]
    scan = [(h, w) for h in range(height - max_shift, max_shift, -1) for w in range(width - max_shift, max_shift, -1)]
    shifted = blurred.permute(0, 2, 3, 1).numpy().copy()
    for pass_index in range(passes):
        bits = rng.bits(pass_index, (len(scan),)).numpy()
        dys = (bits & 0xFFFF) % (2 * max_shift) - max_shift
        dxs = (bits >> 16) % (2 * max_shift) - max_shift
        for image, dy, dx in zip(shifted, dys, dxs):
            for k, (h, w) in enumerate(scan):
                h_prime, w_prime = h + dy[k], w + dx[k]
                image[h, w], image[h_prime, w_prime] = image[h_prime, w_prime], image[h, w]
    return ops.gaussian_blur(torch.from_numpy(shifted).permute(0, 3, 1, 2), sigma, truncate=4.0, mode="edge")


def test_glass_blur_reproduces_the_reference_copy_not_a_swap():
    """Bit-identical to the literal reference loop, including its sequential semantics: a pixel copies
    a neighbour already overwritten earlier in the pass (needs shift >= 2 to reach one: the 64-pixel
    case at scale 2 and an explicit shift of 3), and pass 2 reads pass 1's result."""
    from runner.corruptions.blur import glass_blur

    generator = torch.Generator().manual_seed(0)
    cases = [(torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64), level, 1.0)
             for level in levels("glass_blur")]
    cases += [(torch.rand(2, 1, 64, 64, generator=generator, dtype=torch.float64), levels("glass_blur")[4], 2.0),
              (torch.rand(3, 3, 20, 20, generator=generator, dtype=torch.float64), (0.3, 3, 2), 1.0)]
    for seed in (0, 1, 2):
        for x, level, scale in cases:
            ours = glass_blur(x, level, ImageStreams(seed, 0, len(x), "cpu"), scale)
            expected = reference_glass_blur(x, level, ImageStreams(seed, 0, len(x), "cpu"), scale)
            assert torch.equal(ours, expected), (seed, level, scale)
    # The idiom itself: the neighbour keeps its value (a swap would move x[0, 0] to x[1, 1]).
    a = np.arange(12).reshape(2, 2, 3)
    a[0, 0], a[1, 1] = a[1, 1], a[0, 0]
    assert a[0, 0].tolist() == a[1, 1].tolist() == [9, 10, 11]


def test_elastic_local_warp_grows_with_severity(batches):
    """Documented exception: severity trades the affine jitter (8% of the side at 1 down to 3% at 5,
    which dominates |x_c - x|) for local elastic warping; the local part alone must grow."""
    for size, x in batches.items():
        local = [
            mean_abs_change(x, apply_level(x, "elastic_transform", (amplitude, smoothing, 0.0)))
            for amplitude, smoothing, _ in levels("elastic_transform")
        ]
        assert local[0] < 1e-6 and all(b > a for a, b in zip(local, local[1:])), (size, local)


def test_frost_share_grows_with_severity(batches):
    """Documented exception: the image weight falls as the frost weight rises, so |x_c - x| depends on
    how bright frost and image are. On images dim enough not to clip, the frost's share of the result
    (1 - correlation with the clean image) must grow."""
    for size, x in batches.items():
        dim = 0.5 * x
        share = [one_minus_correlation(corrupt(dim, "frost", s, seed=0), dim) for s in range(1, 6)]
        assert all(b > a for a, b in zip(share, share[1:])), (size, share)


def test_pixelate_output_has_the_retained_resolution(batches, corrupted):
    """Documented exception: BOX resampling at non-integer ratios aliases, so |x_c - x| is not monotone
    (not in the reference at 32 px either). The information kept is: each output channel is a
    linear image of an int(side·c)-pixel one, so its rank is at most that, falling with severity."""
    for size, x in batches.items():
        side = x.shape[-1]
        for severity, (factor,) in enumerate(levels("pixelate"), start=1):
            rank = torch.linalg.matrix_rank(corrupted["pixelate", size, severity].double()).max()
            assert rank <= int(side * factor), (size, severity)


NEUTRAL = {
    "gaussian_noise": (0.0,), "impulse_noise": (0.0,), "defocus_blur": (0.0, 0.0),
    "glass_blur": (0.0, 1, 0), "motion_blur": (0, 1.0), "zoom_blur": (0,),
    "snow": (0.0, 0.0, 1, 0.5, 0, 1.0, 1.0), "frost": (1.0, 0.0), "fog": (0.0, 2.0),
    "brightness": (0.0,), "contrast": (1.0,), "elastic_transform": (0.0, 0.0, 0.0), "pixelate": (1.0,),
}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_constants_are_the_identity(name, batches):
    """Severity 0: the same pipeline (working resolution included) with constants that do nothing.
    Not applicable: shot noise (infinite photon count) and JPEG (lossy at every quality)."""
    for x in batches.values():
        torch.testing.assert_close(apply_level(x, name, NEUTRAL[name], seed=3), x, rtol=0, atol=1e-6)


def test_working_resolution():
    assert [working_factor(s, s) for s in (8, 16, 28, 32, 64)] == [4, 2, 1, 1, 1]
    x = torch.rand(3, 2, 8, 8)
    torch.testing.assert_close(ops.area_downsample(ops.nearest_upsample(x, 4), 4), x, rtol=1e-6, atol=0)


def test_primitives_match_the_reference_libraries():
    from scipy.ndimage import gaussian_filter
    from scipy.ndimage import zoom as scipy_zoom

    image = images("32x32x3", 1)[0, 0].double()
    for factor in (1.01, 1.02, 1.13, 1.25, 2.25):  # Hendrycks' clipped_zoom: crop ceil(n/z), zoom, trim
        crop = int(np.ceil(32 / factor))
        top = (32 - crop) // 2
        zoomed = scipy_zoom(image.numpy()[top : top + crop, top : top + crop], factor, order=1)
        trim = (zoomed.shape[0] - 32) // 2
        matrix = ops.linear_zoom_matrix(32, factor)
        expected = zoomed[trim : trim + 32, trim : trim + 32]
        np.testing.assert_allclose((matrix @ image @ matrix.T).numpy(), expected, atol=1e-12)
    cases = ((0.4, 4.0, "edge", "nearest"), (6.4, 3.0, "symmetric", "reflect"))
    for sigma, truncate, mode, scipy_mode in cases:
        ours = ops.gaussian_blur(image[None, None], sigma, truncate, mode)[0, 0]
        expected = gaussian_filter(image.numpy(), sigma, mode=scipy_mode, truncate=truncate)
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)


def test_brightness_equals_an_hsv_round_trip():
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    x = images("32x32x3", 4).double()
    x[0, :, :4, :4] = 0  # black pixels become grey
    for shift in (0.05, 0.3):
        hsv = rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        expected = torch.from_numpy(hsv_to_rgb(hsv)).permute(0, 3, 1, 2)
        torch.testing.assert_close(brightness(x, (shift,), None, 1.0), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", ("8x8x1", "32x32x3"))
def test_jpeg_and_pixelate_match_pil(size):
    x = images(size, 4)
    pixels = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ours_jpeg = jpeg_compression(x, (58,), None, 1.0)
    for i, array in enumerate(pixels):
        mode = "L" if array.shape[-1] == 1 else "RGB"
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(buffer, "JPEG", quality=58)
        decoded = np.array(Image.open(buffer)).reshape(array.shape)
        assert torch.equal(ours_jpeg[i], torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
        side = array.shape[0]
        small = int(side * 0.75)
        image = Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode)
        boxed = np.array(image.resize((small, small), Image.BOX).resize((side, side), Image.BOX))
        expected = torch.from_numpy(boxed.reshape(array.shape)).permute(2, 0, 1).double() / 255
        ours = pixelate(torch.from_numpy(array).permute(2, 0, 1)[None].double() / 255, (0.75,), None, 1.0)[0]
        assert (ours - expected).abs().max() <= 1 / 255 + 1e-9  # PIL rounds its intermediate to 8 bits


def test_counter_based_random_numbers():
    def lowbias32(v: int) -> int:  # Wellons' hash, written out on Python integers
        v ^= v >> 16
        v = (v * 0x7FEB352D) % 2**32
        v ^= v >> 15
        v = (v * 0x846CA68B) % 2**32
        return v ^ (v >> 16)

    values = [0, 1, 2**31, 2**32 - 1, 123456789]
    assert hash32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]
    streams = ImageStreams(key=5, first_index=0, n=200, device="cpu")
    u = streams.uniform(0, (500,))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    z = streams.normal(1, (500,))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.equal(ImageStreams(5, 150, 50, "cpu").uniform(0, (500,)), u[150:])
    rate = torch.tensor([0.0, 0.5, 30.0, 400.0]).expand(200, 4)
    counts = streams.poisson(2, rate)
    assert torch.equal(counts, counts.round()) and counts[:, 0].eq(0).all()
    torch.testing.assert_close(counts.mean(0), rate[0].double(), rtol=0.06, atol=0.1)


def test_bad_arguments_name_the_problem():
    x = digits8(2)
    with pytest.raises(ValueError, match="corruption name 'rain'"):
        corrupt(x, "rain", 1)
    for severity in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", severity)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 2, "fog", 1)
    with pytest.raises(ValueError, match="channels"):
        corrupt(torch.rand(1, 2, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="float"):
        corrupt((x * 16).long(), "fog", 1)


class TinyModel(torch.nn.Module):
    """A linear classifier fitted in closed form (ridge regression on one-hot labels) to 8x8 digits
    outside the evaluation set: accurate enough that corruptions visibly cost accuracy."""

    def __init__(self):
        super().__init__()
        digits = load_digits()
        features = torch.tensor(digits.images[100:], dtype=torch.float64).flatten(1) / 16
        features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        targets = F.one_hot(torch.tensor(digits.target[100:]), 10).double()
        gram = features.T @ features + 1e-2 * torch.eye(65, dtype=torch.float64)
        self.weights = torch.linalg.solve(gram, features.T @ targets).float()

    def forward(self, x):
        return torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1) @ self.weights


def context(tmp_path=None, batch_size=500):
    return EvalContext(norm="linf", eps=0.1, device=torch.device("cpu"), seed=0, batch_size=batch_size,
                       run_dir=tmp_path)


def test_evaluator_keys_plot_and_mce_against_itself(tmp_path):
    x, y = digits8(30), torch.tensor(load_digits().target[:30])
    model = TinyModel()
    evaluator = build({"name": "corruptions", "severities": [1, 5]}, cfg=None)
    result = evaluator(model, x, y, context(tmp_path / "run"))
    assert result.settings["corruption/mean_acc"]["plot"] == "corruptions.png"  # drawn with the report:
    path = write_corruption_plot(tmp_path / "run", result.metrics, result.settings)
    assert path.name == "corruptions.png" and path.read_bytes()[:4] == b"\x89PNG"
    expected = {"corruption/clean_acc", "corruption/mean_acc", "corruption/sev1/acc", "corruption/sev5/acc"}
    expected |= {f"corruption/{name}/acc" for name in CORRUPTIONS}
    expected |= {f"corruption/{name}/sev{s}/acc" for name in CORRUPTIONS for s in (1, 5)}
    assert set(result.metrics) == expected
    assert all(result.settings[key]["regenerated"] is True for key in result.metrics)
    per_condition = [result.metrics[f"corruption/{n}/sev{s}/acc"] for n in CORRUPTIONS for s in (1, 5)]
    assert result.metrics["corruption/mean_acc"] == pytest.approx(sum(per_condition) / len(per_condition))
    # mCE of a model against its own results: every CE and relative CE is exactly 1; the baseline's
    # evaluation was chunked differently (batch 500 vs 7), which must not change the corrupted sets.
    clean_acc = (TinyModel()(x).argmax(1) == y).double().mean().item()
    assert result.metrics["corruption/clean_acc"] == pytest.approx(clean_acc)
    results = {"metrics": result.metrics, "eval": result.settings, "run": {}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    subset = ["glass_blur", "fog", "pixelate"]
    spec = {"name": "corruptions", "severities": [1, 5], "corruptions": subset, "baseline": str(tmp_path)}
    against = build(spec, cfg=None)
    scored = against(model, x, y, context(batch_size=7))
    same_sets = [f"corruption/{name}/sev{s}/acc" for name in subset for s in (1, 5)]
    assert all(scored.metrics[key] == result.metrics[key] for key in same_sets)
    assert scored.metrics["corruption/mce"] == pytest.approx(1.0)
    assert all(scored.metrics[f"corruption/{name}/ce"] == pytest.approx(1.0) for name in subset)
    assert all(scored.metrics[f"corruption/{name}/relative_ce"] == pytest.approx(1.0) for name in subset)
    comparable = {check["name"]: check["passed"] for check in scored.checks}
    assert comparable["corruption baseline comparable"] is True
    # Without a baseline the mCE check says so, marked skipped, naming the key that would enable it.
    (no_baseline,) = [check for check in result.checks if check["name"] == "corruption mCE against a baseline"]
    assert no_baseline["skipped"] and "corruptions.baseline=" in no_baseline["detail"]
    assert "corruption mCE against a baseline" not in comparable


class NoisyModel(TinyModel):
    """TinyModel with perturbed weights: a worse classifier, to serve as an mCE baseline."""

    def __init__(self, noise: float = 0.05):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.weights = self.weights + noise * torch.randn(self.weights.shape, generator=generator)


def evaluate_to_results(tmp_path, model, x, y, spec) -> dict:
    """What evaluate() writes for a suite [clean (every point), corruptions (spec)], as a results.json."""
    result = build(spec, cfg=None)(model, x, y, context())
    clean_acc = (model(x).argmax(1) == y).double().mean().item()
    results = {"metrics": {"clean/acc": clean_acc, **result.metrics}, "eval": result.settings, "run": {}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    return results


def test_relative_mce_uses_clean_errors_on_the_corrupted_points(tmp_path):
    """corruptions.n_examples corrupts only the first n points: relative CE must subtract both models'
    clean errors on those n points, not the baseline's clean/acc over all of them."""
    x, y = digits8(60), torch.tensor(load_digits().target[:60])
    baseline_model, model = NoisyModel(), TinyModel()
    n, severities, subset = 25, [1, 5], ["gaussian_noise", "contrast", "fog"]
    spec = {"name": "corruptions", "severities": severities, "corruptions": subset, "n_examples": n}
    baseline = evaluate_to_results(tmp_path / "baseline", baseline_model, x, y, spec)
    scored = build({**spec, "baseline": str(tmp_path / "baseline")}, cfg=None)(model, x, y, context())

    def clean_error(classifier, count):
        return 1 - (classifier(x[:count]).argmax(1) == y[:count]).double().mean().item()

    assert clean_error(baseline_model, n) != pytest.approx(clean_error(baseline_model, len(y)))  # a real test
    assert scored.metrics["corruption/clean_acc"] == pytest.approx(1 - clean_error(model, n))
    for name in subset:
        ours = sum(1 - scored.metrics[f"corruption/{name}/sev{s}/acc"] for s in severities)
        theirs = sum(1 - baseline["metrics"][f"corruption/{name}/sev{s}/acc"] for s in severities)
        expected = (ours - len(severities) * clean_error(model, n)) / (
            theirs - len(severities) * clean_error(baseline_model, n))
        assert scored.metrics[f"corruption/{name}/relative_ce"] == pytest.approx(expected), name
    comparable = {check["name"]: check for check in scored.checks}["corruption baseline comparable"]
    assert comparable["passed"], comparable["detail"]


def test_baseline_without_clean_accuracy_on_its_points_or_on_other_points_is_not_comparable(tmp_path):
    x, y = digits8(40), torch.tensor(load_digits().target[:40])
    spec = {"name": "corruptions", "severities": [1, 5], "corruptions": ["fog"], "n_examples": 20}

    def comparable_check(results_dir, points):
        scored = build({**spec, "baseline": str(results_dir)}, cfg=None)(TinyModel(), points, y, context())
        return scored, {check["name"]: check for check in scored.checks}["corruption baseline comparable"]

    # An older baseline: its clean accuracy on the corrupted points and their fingerprint not recorded.
    results = evaluate_to_results(tmp_path / "old", NoisyModel(), x, y, spec)
    del results["metrics"]["corruption/clean_acc"]
    for settings in results["eval"].values():
        del settings["points_sha256"]
    (tmp_path / "old" / "results.json").write_text(json.dumps(results))
    scored, check = comparable_check(tmp_path / "old", x)
    assert not check["passed"] and "lacks corruption/clean_acc" in check["detail"]
    assert "points_sha256: baseline has none" in check["detail"]
    assert "corruption/mce" in scored.metrics and "corruption/relative_mce" not in scored.metrics
    # Same count, same seed and size, other images: the fingerprint differs.
    evaluate_to_results(tmp_path / "other", NoisyModel(), x, y, spec)
    scored, check = comparable_check(tmp_path / "other", x.flip(-1))
    assert not check["passed"] and "points_sha256" in check["detail"] and "other points" in check["detail"]
    scored, check = comparable_check(tmp_path / "other", x)
    assert check["passed"], check["detail"]


def test_evaluator_rejects_bad_specs(tmp_path):
    for spec, match in (({"severities": [0]}, "severities"), ({"corruptions": ["rain"]}, "rain"),
                        ({"colour": 1}, "unknown keys"), ({"baseline": str(tmp_path / "nope")}, "baseline"),
                        ({"n_examples": 0}, "n_examples")):
        with pytest.raises(ValueError, match=match):
            build({"name": "corruptions", **spec}, cfg=None)
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"clean/acc": 0.9}}))
    evaluator = build({"name": "corruptions", "baseline": str(tmp_path / "results.json")}, cfg=None)
    with pytest.raises(ValueError, match="lacks 75 corruption metrics"):
        evaluator(TinyModel(), digits8(4), torch.zeros(4, dtype=torch.long), context())


def test_suite_config_lists_clean_and_corruptions():
    from runner.config import compose

    cfg = compose(["eval=corruptions"])
    assert cfg.eval.name == "corruptions"
    assert [spec["name"] for spec in cfg.eval.evaluators] == ["clean", "corruptions"]
