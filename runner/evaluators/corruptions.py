"""Common-corruption robustness (Hendrycks & Dietterich 2019): accuracy under the 15 corruptions × 5
severities, regenerated here with CIFAR-10-C's constants (`runner.corruptions`), and mCE against a
baseline run (usually ERM) when its results.json is given.

mCE as in the paper: CE_c = Σ_s err(c, s) / Σ_s err_baseline(c, s), mCE = mean_c CE_c; relative mCE
uses the errors above each model's clean error. Every error in these ratios must come from the same
points: with `n_examples` set, only the first n evaluation points are corrupted, so each run records
its clean accuracy on exactly those points (`corruption/clean_acc`, beside the suite's `clean/acc` on
all of them) and a fingerprint of the points; relative mCE uses the baseline's `corruption/clean_acc`.
Numbers are comparable only between runs evaluated on the same points with the same corruption seed;
the check "corruption baseline comparable" says whether they were.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from runner.attacks import model_mode, predict
from runner.corruptions import CORRUPTIONS, SEVERITIES, corrupt, single_thread_if_small, working_factor
from runner.evaluators.base import EvalResult, Evaluator, check_keys
from runner.plots import CORRUPTION_FILE

KEYS = {"name", "severities", "corruptions", "seed", "baseline", "n_examples"}
# Model inputs below this many values per chunk are classified on one CPU thread: for 8×8 digits the
# 76 forward passes took 20 s with 2 threads on a loaded 2-core machine and well under 1 s with one.
SMALL_INPUT = 2**16
CONSTANTS = "CIFAR-10-C (Hendrycks & Dietterich 2019, make_cifar_c.py); frost texture synthesised"
CLEAN_KEY = "corruption/clean_acc"  # clean accuracy on the corrupted points (clean/acc may cover more)
# Settings two runs must share for their corruption errors to be compared (mCE against a baseline).
COMPARED_SETTINGS = ("seed", "n_examples", "regenerated", "image_size", "points_sha256")


def condition_key(name: str, severity: int) -> str:
    return f"corruption/{name}/sev{severity}/acc"


def points_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the images, as float32, and the labels: equal for two runs
    evaluated on the same points, whatever their device or batch size."""
    digest = hashlib.sha256()
    digest.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().long().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _spec_error(key: str, message: str) -> ValueError:
    return ValueError(f"eval.evaluators: corruptions.{key} {message}")


def _as_list(spec: dict, key: str, default) -> list:
    value = spec.get(key, default)
    if isinstance(value, int | str):
        value = [value]
    value = list(value)
    if not value:
        raise _spec_error(key, "must not be empty")
    if len(set(value)) != len(value):
        raise _spec_error(key, f"has duplicates: {value}")
    return value


class Corruptions(Evaluator):
    name = "corruptions"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "corruptions")
        self.severities = _as_list(spec, "severities", SEVERITIES)
        for severity in self.severities:
            if isinstance(severity, bool) or severity not in SEVERITIES:
                raise _spec_error("severities", f"must be integers in 1..5, got {severity!r}")
        self.corruptions = _as_list(spec, "corruptions", CORRUPTIONS)
        for name in self.corruptions:
            if name not in CORRUPTIONS:
                choices = ", ".join(CORRUPTIONS)
                raise _spec_error("corruptions", f"has unknown {name!r}; choose from {choices}")
        self.seed = spec.get("seed")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise _spec_error("seed", f"must be an integer or null, got {self.seed!r}")
        self.n_examples = spec.get("n_examples")
        if self.n_examples is not None and (not isinstance(self.n_examples, int) or self.n_examples <= 0):
            raise _spec_error("n_examples", f"must be a positive integer or null, got {self.n_examples!r}")
        self.baseline_path = None
        if spec.get("baseline") is not None:
            path = Path(str(spec["baseline"]))
            path = path / "results.json" if path.is_dir() else path
            if not path.is_file():
                raise _spec_error("baseline", f"must be a results.json or a run dir with one; no {path}")
            self.baseline_path = path

    def correct_under(self, model, x, y, name: str, severity: int, seed: int, ctx) -> torch.Tensor:
        """Per-example correctness on the corrupted set, built chunk by chunk: the chunking (batch
        size) does not change the corrupted images, which depend on the example's index only."""
        correct = []
        for start in range(0, len(y), ctx.batch_size):
            stop = start + ctx.batch_size
            chunk = corrupt(x[start:stop], name, severity, seed, first_index=start)
            correct.append(self.predict(model, chunk, ctx) == y[start:stop].cpu())
        return torch.cat(correct)

    @staticmethod
    def predict(model, x, ctx) -> torch.Tensor:
        x = x.to(ctx.device)
        with single_thread_if_small(x[: ctx.batch_size].numel(), x.device, limit=SMALL_INPUT):
            return predict(model, x, ctx.batch_size).cpu()

    def __call__(self, model, x, y, ctx):
        began = time.perf_counter()
        if self.n_examples is not None:
            x, y = x[: self.n_examples], y[: self.n_examples]
        seed = ctx.seed if self.seed is None else self.seed
        baseline = None
        if self.baseline_path is not None:  # read first: a bad baseline fails before the long part
            baseline = load_baseline(self.baseline_path, self.corruptions, self.severities)
        n = len(y)
        with model_mode(model, "eval"):
            clean = (self.predict(model, x, ctx) == y.cpu()).double()
            correct = {
                (name, severity): self.correct_under(model, x, y, name, severity, seed, ctx).double()
                for name in self.corruptions
                for severity in self.severities
            }
        seconds = time.perf_counter() - began
        common = {
            "regenerated": True, "constants": CONSTANTS, "seed": seed, "n_examples": n,
            "image_size": list(x.shape[-2:]), "working_factor": working_factor(*x.shape[-2:]),
            "points_sha256": points_fingerprint(x, y),
        }
        result = EvalResult()

        def put(key: str, value: float, per_example: torch.Tensor | None = None, **extra):
            result.metrics[key] = float(value)
            settings = {**common, **extra}
            if per_example is not None:  # an average over conditions: CI from per-example means
                settings["ci95"] = mean_interval(per_example)
            result.settings[key] = settings

        put(CLEAN_KEY, clean.mean())
        for (name, severity), hits in correct.items():
            put(condition_key(name, severity), hits.mean(), corruption=name, severity=severity)
        for name in self.corruptions:
            per_example = torch.stack([correct[name, s] for s in self.severities]).mean(0)
            put(f"corruption/{name}/acc", per_example.mean(), per_example, corruption=name,
                severities=self.severities)
        for severity in self.severities:
            per_example = torch.stack([correct[c, severity] for c in self.corruptions]).mean(0)
            put(f"corruption/sev{severity}/acc", per_example.mean(), per_example, severity=severity,
                corruptions=self.corruptions)
        per_example = torch.stack(list(correct.values())).mean(0)
        put("corruption/mean_acc", per_example.mean(), per_example, corruptions=self.corruptions,
            severities=self.severities, time_s=round(seconds, 3))
        result.checks.append(severity_trend_check(correct, self.corruptions, self.severities))
        if baseline is not None:
            errors = {key: 1 - hits.mean().item() for key, hits in correct.items()}
            mce_metrics, checks = corruption_errors(
                errors, 1 - clean.mean().item(), baseline, self.corruptions, self.severities, common
            )
            for key, value in mce_metrics.items():
                put(key, value, baseline=str(self.baseline_path), baseline_run=baseline["run"])
            result.checks += checks
        else:
            result.checks.append({
                "name": "corruption mCE against a baseline", "passed": True, "skipped": True,
                "detail": "mCE not computed: no baseline run given (corruptions.baseline=<run dir or its "
                          "results.json> in the corruptions entry of eval.evaluators)",
            })
        if ctx.run_dir is not None:  # drawn with the report, from the results (runner.plots)
            result.settings["corruption/mean_acc"]["plot"] = CORRUPTION_FILE
        return result


def mean_interval(per_example: torch.Tensor, z: float = 1.96) -> list[float]:
    """95% CI of a mean over examples of per-example accuracies (independent examples, normal approx.)."""
    n = len(per_example)
    mean = per_example.mean().item()
    half = z * per_example.std().item() / math.sqrt(n) if n > 1 else 1.0
    return [round(max(0.0, mean - half), 5), round(min(1.0, mean + half), 5)]


def severity_trend_check(correct: dict, corruptions: list, severities: list) -> dict:
    """Accuracy at the strongest severity should not exceed accuracy at the mildest (beyond noise)."""
    name = "corruption accuracy does not rise with severity"
    if len(severities) < 2:
        return {"name": name, "passed": True, "detail": "one severity evaluated: nothing to compare"}
    low, high = min(severities), max(severities)
    difference = torch.stack([correct[c, high] - correct[c, low] for c in corruptions]).mean(0)
    mean, half = difference.mean().item(), 1.96 * difference.std().item() / math.sqrt(max(len(difference), 1))
    return {
        "name": name, "passed": mean <= half,
        "detail": f"mean acc(sev {high}) - acc(sev {low}) = {mean:+.4f} (95% noise band ±{half:.4f})",
    }


def load_baseline(path: Path, corruptions: list, severities: list) -> dict:
    results = json.loads(path.read_text())
    metrics = results.get("metrics", {})
    needed = [condition_key(c, s) for c in corruptions for s in severities]
    missing = [key for key in needed if key not in metrics]
    if missing:
        raise _spec_error("baseline", f"{path} lacks {len(missing)} corruption metrics, e.g. {missing[0]!r}: "
                                      "evaluate the baseline with the same corruptions and severities first")
    # The clean error on the baseline's corrupted points, never its clean/acc: that one covers every
    # evaluation point, the corrupted ones only the first corruptions.n_examples.
    return {
        "errors": {(c, s): 1 - metrics[condition_key(c, s)] for c in corruptions for s in severities},
        "clean_error": 1 - metrics[CLEAN_KEY] if CLEAN_KEY in metrics else None,
        "settings": results.get("eval", {}).get("corruption/mean_acc", {}),
        "run": results.get("run", {}),
    }


def corruption_errors(errors, clean_error, baseline, corruptions, severities, common) -> tuple[dict, list]:
    """CE and relative CE per corruption and their means (mCE, relative mCE), with checks."""
    metrics, checks, skipped, relative_skipped = {}, [], [], []
    ce, relative = [], []
    for name in corruptions:
        ours = sum(errors[name, s] for s in severities)
        theirs = sum(baseline["errors"][name, s] for s in severities)
        if theirs <= 0:
            skipped.append(name)
            continue
        metrics[f"corruption/{name}/ce"] = ours / theirs
        ce.append(ours / theirs)
        if baseline["clean_error"] is not None:
            theirs_above = theirs - len(severities) * baseline["clean_error"]
            if theirs_above > 0:
                value = (ours - len(severities) * clean_error) / theirs_above
                metrics[f"corruption/{name}/relative_ce"] = value
                relative.append(value)
            else:
                relative_skipped.append(name)
    if ce:
        metrics["corruption/mce"] = sum(ce) / len(ce)
    if relative and len(relative) == len(ce):
        metrics["corruption/relative_mce"] = sum(relative) / len(relative)
    details = [f"baseline made no error on {skipped}: CE undefined there, left out of mCE"] if skipped else []
    if baseline["clean_error"] is None:
        details.append(f"baseline has no {CLEAN_KEY}: relative CE not computed")
    elif relative_skipped:
        details.append(f"baseline no worse than clean on {relative_skipped}: relative CE undefined there, "
                       "relative mCE not reported")
    checks.append({
        "name": "corruption baseline has errors to normalise by", "passed": not skipped,
        "detail": "; ".join(details) or f"CE and relative CE defined for all {len(corruptions)} corruptions",
    })
    theirs = baseline["settings"]
    differences = []
    if baseline["clean_error"] is None:
        differences.append(f"baseline lacks {CLEAN_KEY} (its clean accuracy on the corrupted points; "
                           "evaluated before it was recorded?): re-evaluate the baseline")
    for key in COMPARED_SETTINGS:
        if key not in theirs:
            differences.append(f"{key}: baseline has none, ours {common[key]!r}")
        elif theirs[key] != common[key]:
            other_points = " (other points)" if key == "points_sha256" else ""
            differences.append(f"{key}: baseline {theirs[key]!r} vs ours {common[key]!r}{other_points}")
    checks.append({
        "name": "corruption baseline comparable", "passed": not differences,
        "detail": "; ".join(differences) or "same points, corruption seed and regenerated sets",
    })
    return metrics, checks


def build(spec, cfg):
    return Corruptions(dict(spec), cfg)
