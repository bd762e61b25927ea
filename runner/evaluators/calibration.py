"""Calibration: expected calibration error (ECE) on clean and on adversarial inputs, and a reliability
diagram (reliability.png in the run directory).

ECE (Guo et al. 2017; Naeini et al. 2015) with `bins` equal-width bins (15 by default) over the
top-class softmax probability, bin i holding confidences in (i/B, (i+1)/B]:
ECE = Σ_i (n_i / n) · |accuracy_i − mean confidence_i|. Adversarial inputs: PGD (cross-entropy) at
threat.eps, confidence and correctness of the prediction on the perturbed input.

The 95% interval is a seeded basic (reverse-percentile) bootstrap over examples. The binned ECE is
biased upwards (sampling noise alone gives every bin a gap), so resampled ECEs sit above the estimate
and a percentile interval sits above it too: for perfectly calibrated models it excluded the true ECE,
0, every time, and sometimes the estimate itself. The basic interval [2·ECE − q97.5, 2·ECE − q2.5]
reflects the resamples around the estimate, which moves it down by the bias the bootstrap sees;
clipped to [0, 1] and widened where needed to contain the estimate (when the bias the resamples show
exceeds their spread, the reflected interval would otherwise end below the number reported).
"""

import math
import time
from pathlib import Path

import torch

from runner.attacks import default_alpha, model_mode
from runner.evaluators.base import EvalResult, Evaluator, check_keys
from runner.evaluators.pgd import pgd_correct, positive_int, spec_error
from runner.plots import write_reliability

KEYS = {"name", "bins", "steps", "adversarial", "bootstrap"}


def bin_statistics(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> dict:
    """Per-bin count, mean confidence and accuracy, and the ECE."""
    confidence, correct = confidence.double().cpu(), correct.double().cpu()
    inner_edges = torch.arange(1, bins, dtype=torch.float64) / bins  # i/B exactly, as the bins are defined
    index = torch.bucketize(confidence, inner_edges, right=False)  # (lo, hi] bins; 0 goes to the first
    count = torch.bincount(index, minlength=bins).double()
    confidence_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    filled = count > 0
    mean_confidence = torch.where(filled, confidence_sum / count.clamp_min(1), torch.nan)
    accuracy = torch.where(filled, correct_sum / count.clamp_min(1), torch.nan)
    gaps = (correct_sum - confidence_sum).abs()  # n_i · |acc_i − conf_i|
    return {
        "count": count,
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "ece": (gaps.sum() / max(len(confidence), 1)).item(),
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    return bin_statistics(confidence, correct, bins)["ece"]


def bootstrap_interval(confidence, correct, bins: int, resamples: int, seed: int) -> list[float] | None:
    """Basic bootstrap 95% interval of the ECE (see the module docstring), or None when there is
    nothing to resample (no resamples asked for, or fewer than 2 examples)."""
    n = len(confidence)
    if resamples == 0 or n < 2:
        return None
    estimate = expected_calibration_error(confidence, correct, bins)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        pick = torch.randint(n, (n,), generator=generator)
        values.append(expected_calibration_error(confidence[pick], correct[pick], bins))
    values = torch.tensor(values, dtype=torch.float64)
    low_quantile, high_quantile = torch.quantile(values, 0.025).item(), torch.quantile(values, 0.975).item()
    low = min(max(0.0, 2 * estimate - high_quantile), estimate)
    high = min(max(estimate, 2 * estimate - low_quantile), 1.0)
    # Rounded outwards to 5 decimals; the estimate stays inside even at the last binary digit.
    return [min(math.floor(low * 1e5) / 1e5, estimate), max(math.ceil(high * 1e5) / 1e5, estimate)]


def interval_method(resamples: int, n: int) -> str:
    if resamples == 0:
        return "none"
    if n < 2:
        return "none (fewer than 2 examples)"
    return (f"basic (reverse-percentile) bootstrap over examples ({resamples} resamples), "
            "widened to contain the estimate")


@torch.no_grad()
def confidence_and_correct(model, x, y, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    confidences, corrects = [], []
    with model_mode(model, "eval"):
        for i in range(0, len(y), batch_size):
            probabilities = model(x[i : i + batch_size]).float().softmax(1)
            top, predicted = probabilities.max(1)
            confidences.append(top.cpu())
            corrects.append((predicted == y[i : i + batch_size]).cpu())
    return torch.cat(confidences), torch.cat(corrects)


class Calibration(Evaluator):
    name = "calibration"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "calibration")
        self.bins = positive_int(spec, "calibration", "bins", 15)
        self.steps = positive_int(spec, "calibration", "steps", 20)
        self.adversarial = spec.get("adversarial", True)
        if not isinstance(self.adversarial, bool):
            raise spec_error("calibration", "adversarial", f"must be true or false, got {self.adversarial!r}")
        self.bootstrap = spec.get("bootstrap", 200)
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise spec_error(
                "calibration", "bootstrap", f"must be a non-negative integer, got {self.bootstrap!r}"
            )

    def __call__(self, model, x, y, ctx):
        result = EvalResult()
        common = {
            "bins": self.bins,
            "binning": "equal-width on the top softmax probability, (lo, hi] bins",
            "n_examples": len(y),
            "ci95_method": interval_method(self.bootstrap, len(y)),
        }
        panels = []
        conditions = [("clean", "calibration/ece", None)]
        if self.adversarial:
            conditions.append(("adversarial", "calibration/adv_ece", ctx.eps))
        for title, key, eps in conditions:
            start = time.perf_counter()
            inputs, attack = x, {"attack": "none"}
            if eps is not None:
                _, inputs = pgd_correct(
                    model,
                    x,
                    y,
                    eps=eps,
                    norm=ctx.norm,
                    steps=self.steps,
                    restarts=1,
                    alpha=None,
                    loss="ce",
                    seed=ctx.seed,
                    batch_size=ctx.batch_size,
                    return_adversarial=True,
                )
                attack = {
                    "attack": "pgd",
                    "norm": ctx.norm,
                    "eps": eps,
                    "eps_255": round(eps * 255, 3),
                    "steps": self.steps,
                    "restarts": 1,
                    "alpha": default_alpha(eps, self.steps),
                    "loss": "ce",
                }
            confidence, correct = confidence_and_correct(model, inputs, y, ctx.batch_size)
            stats = bin_statistics(confidence, correct, self.bins)
            panels.append((f"{title} (PGD-{self.steps}, eps {eps:.4g})" if eps is not None else title, stats))
            result.metrics[key] = stats["ece"]
            result.settings[key] = {
                **common,
                **attack,
                "seed": ctx.seed,
                "accuracy": correct.double().mean().item(),
                "mean_confidence": confidence.double().mean().item(),
                "ci95": bootstrap_interval(confidence, correct, self.bins, self.bootstrap, ctx.seed),
                "time_s": round(time.perf_counter() - start, 3),
            }
        if ctx.run_dir is not None:
            intervals = [result.settings[key]["ci95"] for key in result.settings]  # one per panel, in order
            path = write_reliability(Path(ctx.run_dir), panels, self.bins, intervals)
            for key in result.settings:
                result.settings[key]["plot"] = path.name
        return result


def build(spec, cfg):
    return Calibration(dict(spec), cfg)
