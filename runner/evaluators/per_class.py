"""Per-class and worst-class accuracy, clean and robust (robust fairness: Xu et al. 2021; DAFA).

Clean correctness comes from the suite's `clean` evaluator (or is computed), robust correctness from
the strongest earlier attack (`robust_from`, default AutoAttack, then PGD); without one, PGD is run
here. Metrics: `class/<c>/acc`, `class/<c>/robust_acc`, `class/worst_acc` (clean), `class/robust_worst_acc`,
each with a Wilson interval over that class's points.
"""

import time

import torch

from runner.attacks import predict
from runner.evaluators.base import EvalResult, Evaluator, check_keys
from runner.evaluators.pgd import pgd_correct, positive_int, spec_error

KEYS = {"name", "robust_from", "steps"}
DEFAULT_ROBUST_FROM = ("autoattack", "pgd")


def per_class_accuracy(correct: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[float, int]]:
    """{class: (accuracy, count)} over the classes present in y."""
    correct, y = correct.cpu().double(), y.cpu()
    return {int(c): (correct[y == c].mean().item(), int((y == c).sum())) for c in torch.unique(y)}


class PerClass(Evaluator):
    name = "per_class"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "per_class")
        robust_from = spec.get("robust_from", list(DEFAULT_ROBUST_FROM))
        self.robust_from = [robust_from] if isinstance(robust_from, str) else list(robust_from)
        if not self.robust_from or not all(isinstance(name, str) for name in self.robust_from):
            raise spec_error("per_class", "robust_from", f"must list evaluator names, got {robust_from!r}")
        self.steps = positive_int(spec, "per_class", "steps", 50)

    def robust_correct(self, model, x, y, ctx) -> tuple[torch.Tensor, dict]:
        for name in self.robust_from:
            mask = ctx.per_example.get(name)
            if mask is not None:
                return mask.cpu(), {
                    "attack": name,
                    "norm": ctx.norm,
                    "eps": ctx.eps,
                    "eps_255": round(ctx.eps * 255, 3),
                    "robust_source": f"per-point results of the '{name}' evaluator (its settings apply)",
                }
        start = time.perf_counter()
        correct = pgd_correct(
            model,
            x,
            y,
            eps=ctx.eps,
            norm=ctx.norm,
            steps=self.steps,
            restarts=1,
            alpha=None,
            loss="ce",
            seed=ctx.seed,
            batch_size=ctx.batch_size,
        )
        return correct, {
            "robust_source": "PGD run by per_class",
            "attack": "pgd",
            "steps": self.steps,
            "restarts": 1,
            "norm": ctx.norm,
            "eps": ctx.eps,
            "eps_255": round(ctx.eps * 255, 3),
            "time_s": round(time.perf_counter() - start, 3),
        }

    def __call__(self, model, x, y, ctx):
        result = EvalResult()
        clean = ctx.per_example.get("clean")
        clean = clean.cpu() if clean is not None else (predict(model, x, ctx.batch_size) == y).cpu()
        robust, robust_settings = self.robust_correct(model, x, y, ctx)
        total = len(y)
        for kind, correct, extra in (
            ("acc", clean, {"attack": "none"}),
            ("robust_acc", robust, robust_settings),
        ):
            n = len(correct)  # a robust evaluator may have used only the first n points
            per_class = per_class_accuracy(correct, y[:n])
            for c, (accuracy, count) in per_class.items():
                key = f"class/{c}/{kind}"
                result.metrics[key] = accuracy
                result.settings[key] = {
                    **extra,
                    "class": c,
                    "n_examples": count,
                    "seed": ctx.seed,
                    "examples": f"the {count} points of class {c} among the first {n} test points",
                }
            worst = min(per_class, key=lambda c: per_class[c][0])
            best = max(per_class, key=lambda c: per_class[c][0])
            key = "class/worst_acc" if kind == "acc" else "class/robust_worst_acc"
            result.metrics[key] = per_class[worst][0]
            result.settings[key] = {
                **extra,
                "class": worst,
                "n_examples": per_class[worst][1],
                "seed": ctx.seed,
                "examples": f"the {per_class[worst][1]} points of class {worst} "
                f"(the worst of {len(per_class)}) among the first {n} test points",
                "best_class": best,
                "best_acc": per_class[best][0],
                "evaluated_points": n if n == total else f"{n} of {total}",
            }
        return result


def build(spec, cfg):
    return PerClass(dict(spec), cfg)
