"""Clean accuracy: the denominator every robust number is read against."""

import time

from runner.attacks import predict
from runner.evaluators.base import EvalResult, Evaluator, check_keys


class Clean(Evaluator):
    name = "clean"

    def __call__(self, model, x, y, ctx):
        start = time.perf_counter()
        correct = predict(model, x, ctx.batch_size) == y
        acc = correct.float().mean().item()
        settings = {"n_examples": len(y), "time_s": time.perf_counter() - start}
        return EvalResult({"clean/acc": acc}, {"clean/acc": settings}, per_example={"clean": correct.cpu()})

def build(spec, cfg):
    check_keys(spec, (), "clean")
    return Clean(spec, cfg)

__all__ = ["Clean", "build"]
