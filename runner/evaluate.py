"""Run an evaluation suite (a list of evaluators) on a model and assemble results.json's sections."""

import importlib
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from runner.evaluators.base import EvalContext
from runner.precision import EVAL_PRECISION, exact_fp32
from runner.tracking import log

WILSON = "Wilson score interval (binomial, n independent test points)"
# Intervals evaluators compute themselves, when their settings do not name the method.
CI_METHODS = {
    "corruptions": "normal approximation over per-example mean accuracies (mean ± 1.96·sd/√n)",
    "calibration": "basic bootstrap over examples",
}
# Per-point orderings that must hold whatever the model: a point certified robust cannot be attacked,
# and a point an attack fools cannot count as robust under a weaker notion. (stronger, weaker) pairs.
ORDER = [("certified", "autoattack"), ("certified", "pgd"), ("autoattack", "clean"), ("pgd", "clean")]


def build_evaluators(cfg) -> list:
    evaluators = []
    for i, spec in enumerate(cfg.eval.evaluators):
        # Plain containers (lists, not ListConfig), interpolations such as ${threat.eps} resolved.
        spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
        if not isinstance(spec, dict):
            raise ValueError(f"eval.evaluators[{i}] must be a mapping like {{name: pgd}}, got {spec!r}")
        name = spec.get("name")
        try:
            module = importlib.import_module(f"runner.evaluators.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"runner.evaluators.{name}":
                raise
            raise ValueError(
                f"eval.evaluators[{i}].name={name!r} has no module runner/evaluators/{name}.py"
            ) from None
        evaluators.append(module.build(spec, cfg))
    return evaluators


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% confidence interval of an accuracy measured on n points (Wilson score: good near 0 and 1)."""
    if n == 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 5), round(min(1.0, centre + half), 5)]


def prefix_violations(stronger: torch.Tensor, weaker: torch.Tensor) -> tuple[int, int]:
    """(points true under `stronger` but not under `weaker`, points compared): an evaluator may have used
    only the first n points (every subset is a prefix of one fixed order)."""
    n = min(len(stronger), len(weaker))
    return int((stronger[:n].cpu() & ~weaker[:n].cpu()).sum()), n


def order_checks(per_example: dict) -> list[dict]:
    checks = []
    for strong, weak in ORDER:
        if strong in per_example and weak in per_example:
            violations, n = prefix_violations(per_example[strong], per_example[weak])
            checks.append(
                {
                    "name": f"{strong} <= {weak} per point",
                    "passed": violations == 0,
                    "detail": f"{violations} of {n} points robust under '{strong}' but not under '{weak}'",
                }
            )
    return checks


def evaluation_subset(x, y, n_examples):
    """The first n test points in the split's fixed order: the same points for every run and seed."""
    if n_examples is None or n_examples >= len(y):
        return x, y
    if n_examples <= 0:
        raise ValueError(f"eval.n_examples must be positive or null, got {n_examples}")
    return x[:n_examples], y[:n_examples]


def summary_line(result, limit: int = 8) -> str:
    """The evaluator's headline numbers for the log; breakdowns (per class, per corruption) stay in
    results.json and report.md."""
    from runner.report_tables import DETAIL_KEY

    shown = [(k, v) for k, v in result.metrics.items() if isinstance(v, float) and not DETAIL_KEY.match(k)]
    text = " ".join(f"{k}={v:.4f}" for k, v in shown[:limit])
    hidden = len(result.metrics) - min(len(shown), limit)
    if hidden:
        text += f" (+{hidden} more in results.json)"
    run = [c for c in result.checks if not c.get("skipped")]
    failed = sum(not c["passed"] for c in run)
    if run:
        text += f" [{len(run) - failed}/{len(run)} checks passed]"
    return text.strip()


def examples_description(cfg, n: int) -> str:
    return f"first {n} of the {cfg.dataset.name} test split (fixed order, independent of every seed)"


@exact_fp32()  # certificates and attacks in IEEE fp32, not TF32 (runner/precision.py)
def evaluate(model, cfg, x, y, device, run_dir: Path | None, model_source: str | None = None,
             info: dict | None = None) -> dict:
    """Returns {"metrics", "eval", "checks", "skipped"} for results.json and, when run_dir is set, writes
    report.md and the plots there (`model_source`: which checkpoint the numbers are of, for its header;
    `info`: results.json's other sections — run, train, env, eval_threat... — for the header, else the
    config and this process say what they can). The model is put in eval mode (fp32), and every evaluator
    runs with TF32 and cuDNN autotuning off (`exact_fp32`)."""
    # A channels-last model (train.channels_last) is evaluated in the default layout: evaluators and attack
    # packages flatten gradients and perturbations with .view, which channels-last tensors refuse, and IEEE
    # fp32 convolutions gain little from the layout.
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    x, y = evaluation_subset(x, y, cfg.eval.n_examples)
    x, y = x.to(device), y.to(device)
    ctx = EvalContext(
        norm=cfg.threat.norm,
        eps=float(cfg.threat.eps),
        device=device,
        seed=cfg.eval.seed,
        batch_size=cfg.eval.batch_size,
        run_dir=run_dir,
    )
    out = {"metrics": {}, "eval": {}, "checks": [], "skipped": []}
    for evaluator in build_evaluators(cfg):
        ok, reason = evaluator.supports(model)
        if not ok:
            out["checks"].append({"name": f"{evaluator.name} applicable", "passed": True, "skipped": True,
                                  "detail": f"skipped: {reason}"})
            out["skipped"].append({"evaluator": evaluator.name, "reason": reason})
            log.info(f"eval {evaluator.name}: skipped ({reason})")
            continue
        start = time.perf_counter()
        result = evaluator(model, x, y, ctx)
        for key, value in result.metrics.items():
            settings = {"evaluator": evaluator.name, **result.settings.get(key, {})}
            if key.endswith("acc"):
                settings.setdefault("n_examples", len(y))
                settings.setdefault("examples", examples_description(cfg, settings["n_examples"]))
                # An evaluator that averages over conditions gives its own interval; a plain accuracy
                # over n independent points gets Wilson's.
                if "ci95" not in settings:
                    settings["ci95"] = wilson_interval(value, settings["n_examples"])
                    settings.setdefault("ci95_method", WILSON)
            settings.setdefault("ci95_method", CI_METHODS.get(evaluator.name) if settings.get("ci95") else None)
            if "eps_255" in settings and settings.get("norm", ctx.norm) != "linf":
                settings["eps_255"] = None  # /255 is the L-inf convention
            out["metrics"][key] = value
            out["eval"][key] = settings
        out["checks"] += result.checks
        ctx.per_example.update(result.per_example)
        ctx.metrics.update(result.metrics)
        log.info(f"eval {evaluator.name}: {summary_line(result)} ({time.perf_counter() - start:.1f}s)")
    out["checks"] += order_checks(ctx.per_example)
    for check in out["checks"]:
        if not check["passed"]:
            log.info(f"CHECK FAILED {check['name']}: {check['detail']}")
    if run_dir is not None:
        from runner.report import write_report

        write_per_example(Path(run_dir) / PER_EXAMPLE_FILE, ctx.per_example, examples_description(cfg, len(y)))
        path = write_report(Path(run_dir), {**(info or report_info(cfg, device)), **out}, cfg, model_source)
        log.info(f"eval report: {path}")
    return out


PER_EXAMPLE_FILE = "per_example.json"


def write_per_example(path: Path, per_example: dict, examples: str) -> None:
    """Every evaluator's per-point result ("1": correct / robust / certified) as one string per name, in
    the test split's fixed order: what paired comparisons between runs and per-point audits need.
    Read back with `[c == "1" for c in points[name]]`."""
    from runner.tracking import write_json

    points = {name: "".join("1" if v else "0" for v in mask.cpu().tolist()) for name, mask in per_example.items()}
    write_json(path, {"examples": examples, "n": {name: len(bits) for name, bits in points.items()},
                      "points": points})


def report_info(cfg, device) -> dict:
    """What a report written before results.json is assembled can know about the run: the config's
    training seed and threat, and this process's software (the training process, for robust-train)."""
    from runner.report_header import threat_summary
    from runner.tracking import run_environment

    threat = threat_summary(cfg.threat.norm, cfg.threat.eps)
    return {"run": {"seed": cfg.seed, "threat": threat}, "eval_threat": threat,
            "env": {**environment(device), **run_environment(cfg)}}


def environment(device) -> dict:
    try:
        git = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device), "git": git,
           "eval_precision": EVAL_PRECISION}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
