"""PGD robust accuracy at threat.eps (and optionally over a list of eps: the robustness curve).

Model in eval mode, fp32, explicit seed; with restarts, each example keeps its own worst case.
"""

import time

import torch

from runner.attacks import default_alpha, pgd, predict
from runner.evaluators.base import EvalResult, Evaluator

KEYS = {"name", "steps", "restarts", "alpha", "eps", "norm"}


class PGD(Evaluator):
    name = "pgd"

    def attack_correct(self, model, x, y, ctx, eps: float) -> torch.Tensor:
        """Per-example correctness under PGD at `eps`, batched, seeded by the evaluation seed."""
        steps, restarts = self.spec.get("steps", 50), self.spec.get("restarts", 1)
        alpha = self.spec.get("alpha")
        norm = self.spec.get("norm", ctx.norm)
        g = torch.Generator(device=x.device).manual_seed(ctx.seed)
        correct = []
        for i in range(0, len(y), ctx.batch_size):
            xb, yb = x[i : i + ctx.batch_size], y[i : i + ctx.batch_size]
            with torch.enable_grad():
                x_adv = pgd(model, xb, yb, eps=eps, norm=norm, steps=steps, alpha=alpha, restarts=restarts, generator=g)
            correct.append(predict(model, x_adv, ctx.batch_size) == yb)
        return torch.cat(correct)

    def settings(self, ctx, eps: float, n: int, seconds: float) -> dict:
        steps = self.spec.get("steps", 50)
        return {
            "attack": "pgd", "norm": self.spec.get("norm", ctx.norm), "eps": eps, "eps_255": round(eps * 255, 3),
            "steps": steps, "restarts": self.spec.get("restarts", 1),
            "alpha": self.spec.get("alpha") or default_alpha(eps, steps), "loss": "ce",
            "n_examples": n, "seed": ctx.seed, "time_s": round(seconds, 3),
        }

    def __call__(self, model, x, y, ctx):
        result = EvalResult()
        eps_list = self.spec.get("eps", ctx.eps)
        eps_list = list(eps_list) if isinstance(eps_list, list | tuple) else [eps_list]
        for eps in eps_list:
            start = time.perf_counter()
            correct = self.attack_correct(model, x, y, ctx, float(eps))
            key = "pgd/acc" if float(eps) == ctx.eps else f"pgd/eps_{float(eps):g}/acc"
            result.metrics[key] = correct.float().mean().item()
            result.settings[key] = self.settings(ctx, float(eps), len(y), time.perf_counter() - start)
            if key == "pgd/acc":
                result.per_example["pgd"] = correct.cpu()
        return result


def build(spec, cfg):
    unknown = set(spec) - KEYS
    if unknown:
        raise ValueError(f"eval.evaluators: pgd got unknown keys {sorted(unknown)}; allowed: {sorted(KEYS)}")
    return PGD(spec, cfg)
