"""PGD robust accuracy at threat.eps, and over a list of eps (the robustness curve), L∞ or L2.

Model in eval mode, fp32, explicit seed; with restarts, each example keeps its own worst case (the
runner's one PGD). Spec keys: steps (50), restarts (1), alpha (null: 2.5·eps/steps), loss (ce | margin),
norm (threat.norm), eps (a number, "k/255", or a list of them) and eps_factors (multiples of threat.eps).
The curve always contains threat.eps when the norm is the threat's, so `pgd/acc` is always there.

The helpers `parse_eps`, `eps_list` and `threat_key` are shared by the other attack evaluators
(AutoAttack, sanity), so every attack names its curve the same way.
"""

import math
import time

import torch

from runner.attacks import NORMS, default_alpha, model_mode, per_example_ce, pgd, predict
from runner.evaluators.base import EvalResult, Evaluator, check_keys

KEYS = {"name", "steps", "restarts", "alpha", "eps", "eps_factors", "norm", "loss"}
LOSSES = ("ce", "margin")


def spec_error(evaluator: str, key: str, message: str) -> ValueError:
    return ValueError(f"eval.evaluators: {evaluator}.{key} {message}")


def parse_eps(value, evaluator: str, key: str = "eps") -> float:
    """A number in pixel units, or the string "k/255" (e.g. "8/255")."""
    if isinstance(value, str) and value.strip().endswith("/255"):
        numerator = value.strip()[: -len("/255")]
        try:
            value = float(numerator) / 255
        except ValueError:
            raise spec_error(evaluator, key, f"must be a number or 'k/255', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise spec_error(evaluator, key, f"must be a non-negative number or 'k/255', got {value!r}")
    return float(value)


def requested_eps(spec: dict, evaluator: str) -> tuple[list[float], list[float]]:
    """The spec's eps values (a number, "k/255" or a list of them) and eps_factors, validated."""
    raw = spec.get("eps")
    raw = [] if raw is None else list(raw) if isinstance(raw, list | tuple) else [raw]
    factors = spec.get("eps_factors") or []
    if not isinstance(factors, list | tuple):
        raise spec_error(evaluator, "eps_factors", f"must be a list of numbers, got {factors!r}")
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
            raise spec_error(evaluator, "eps_factors", f"must be non-negative numbers, got {factor!r}")
    return [parse_eps(v, evaluator) for v in raw], [float(f) for f in factors]


def eps_list(spec: dict, evaluator: str, threat_eps: float, norm: str, threat_norm: str) -> list[float]:
    """The eps values an attack evaluator runs at: spec eps, eps_factors × threat.eps, and threat.eps
    itself when the norm is the threat's. Sorted ascending, duplicates removed."""
    values, factors = requested_eps(spec, evaluator)
    if norm != threat_norm and (factors or not values):
        raise spec_error(
            evaluator,
            "eps",
            f"must list absolute eps values when norm={norm!r} differs from "
            f"threat.norm={threat_norm!r} (eps_factors scale threat.eps)",
        )
    values += [factor * threat_eps for factor in factors]
    if norm == threat_norm:
        values.append(threat_eps)
    unique = []
    for value in sorted(values):
        if not unique or not math.isclose(value, unique[-1], rel_tol=1e-9, abs_tol=1e-12):
            unique.append(value)
    return unique


def threat_key(prefix: str, norm: str, eps: float, threat_norm: str, threat_eps: float) -> str:
    """`<prefix>/acc` at the threat model; `<prefix>/eps_<eps>/acc` elsewhere on the curve, with the
    norm in the key when it is not the threat's (e.g. `pgd/l2/eps_0.5/acc`)."""
    if norm == threat_norm and math.isclose(eps, threat_eps, rel_tol=1e-9, abs_tol=1e-12):
        return f"{prefix}/acc"
    if norm == threat_norm:
        return f"{prefix}/eps_{eps:g}/acc"
    return f"{prefix}/{norm}/eps_{eps:g}/acc"


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j≠y} z_j − z_y: does not saturate where cross-entropy does."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return others.max(1).values - true


def loss_function(name: str):
    return margin_loss if name == "margin" else None  # None: pgd's per-example cross-entropy


def input_gradients(model, x, y, loss_fn) -> torch.Tensor:
    """Per-example input gradients of `loss_fn(model(x), y)`, flattened to [N, D]."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(model(x), y).sum(), x)
    return grad.flatten(1)


def zero_gradient_points(model, x, y, loss: str, batch_size: int) -> torch.Tensor:
    """Where the attack's loss has an all-zero input gradient at x (eval mode): a saturated softmax (every
    cross-entropy gradient underflows once the margin is large enough) or a masked, piecewise-constant
    model. PGD's sign step does not move such a point, so "robust" there is not a measurement."""
    loss_fn = loss_function(loss) or per_example_ce
    with model_mode(model, "eval"):
        zero = [input_gradients(model, x[i : i + batch_size], y[i : i + batch_size], loss_fn).abs().sum(1) == 0
                for i in range(0, len(y), batch_size)]
    return torch.cat(zero).cpu()


def stuck_points_check(robust: dict, zero: torch.Tensor, loss: str) -> dict:
    """Every point PGD leaves robust must have given it a gradient to follow (`robust`: key -> mask)."""
    stuck = {key: int((mask & zero).sum()) for key, mask in robust.items()}
    worst = max(stuck, key=stuck.get)
    passed = stuck[worst] == 0
    detail = (
        f"{stuck[worst]} of {int(robust[worst].sum())} points counted robust ({worst}) have an all-zero {loss} "
        "input gradient at x: PGD cannot move them (softmax saturation or masked gradients), so their "
        "robustness is unmeasured; evaluate with {name: pgd, loss: margin} or AutoAttack (eval=standard)"
        if not passed
        else f"every point counted robust has a non-zero {loss} input gradient at x ({len(zero)} points)"
    )
    return {"name": "pgd: robust points have a non-zero attack gradient", "passed": passed, "detail": detail}


BATCH_SEED_STRIDE = 7919


def pgd_correct(
    model, x, y, *, eps, norm, steps, restarts, alpha, loss, seed, batch_size, return_adversarial=False
):
    """Per-example correctness under PGD (eval mode, batched, seeded); optionally the adversarial inputs.

    Each batch draws its random starts from its own seed, so a batch's first restart is the same draw
    whatever the number of restarts: with restarts the result is never worse for any example, however
    the points are batched (the sanity suite checks exactly that)."""
    generator = torch.Generator(device=x.device)
    correct, adversarial = [], []
    with model_mode(model, "eval"):
        for i in range(0, len(y), batch_size):
            generator.manual_seed(seed + BATCH_SEED_STRIDE * i)  # the first batch: `seed` itself
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            with torch.enable_grad():
                x_adv = pgd(
                    model,
                    xb,
                    yb,
                    eps=eps,
                    norm=norm,
                    steps=steps,
                    alpha=alpha,
                    restarts=restarts,
                    loss_fn=loss_function(loss),
                    generator=generator,
                )
            # x itself lies in the ball: a point is robust only if it is also classified correctly.
            correct.append((predict(model, xb, batch_size) == yb) & (predict(model, x_adv, batch_size) == yb))
            if return_adversarial:
                adversarial.append(x_adv)
    correct = torch.cat(correct).cpu()
    return (correct, torch.cat(adversarial)) if return_adversarial else correct


def positive_int(spec: dict, evaluator: str, key: str, default: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise spec_error(evaluator, key, f"must be a positive integer, got {value!r}")
    return value


class PGD(Evaluator):
    name = "pgd"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "pgd")
        self.steps = positive_int(spec, "pgd", "steps", 50)
        self.restarts = positive_int(spec, "pgd", "restarts", 1)
        self.alpha = spec.get("alpha")
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0
        ):
            raise spec_error("pgd", "alpha", f"must be a positive number or null, got {self.alpha!r}")
        self.loss = spec.get("loss", "ce")
        if self.loss not in LOSSES:
            raise spec_error("pgd", "loss", f"must be one of {LOSSES}, got {self.loss!r}")
        self.norm = spec.get("norm")
        if self.norm is not None and self.norm not in NORMS:
            raise spec_error("pgd", "norm", f"must be one of {NORMS}, got {self.norm!r}")
        requested_eps(spec, "pgd")

    def settings(self, ctx, norm: str, eps: float, n: int, seconds: float) -> dict:
        alpha = float(self.alpha) if self.alpha is not None else default_alpha(eps, self.steps)
        return {
            "attack": "pgd",
            "norm": norm,
            "eps": eps,
            "eps_255": round(eps * 255, 3),
            "steps": self.steps,
            "restarts": self.restarts,
            "restart_selection": "per example worst case",
            "alpha": alpha,
            "loss": self.loss,
            "init": "uniform",
            "n_examples": n,
            "seed": ctx.seed,
            # Each batch of the fixed order draws its random starts from seed + 7919 x its first index.
            "batch_size": ctx.batch_size,
            "time_s": round(seconds, 3),
        }

    def __call__(self, model, x, y, ctx):
        result, robust = EvalResult(), {}
        norm = self.norm or ctx.norm
        for eps in eps_list(self.spec, "pgd", ctx.eps, norm, ctx.norm):
            start = time.perf_counter()
            correct = pgd_correct(
                model,
                x,
                y,
                eps=eps,
                norm=norm,
                steps=self.steps,
                restarts=self.restarts,
                alpha=self.alpha,
                loss=self.loss,
                seed=ctx.seed,
                batch_size=ctx.batch_size,
            )
            key = threat_key("pgd", norm, eps, ctx.norm, ctx.eps)
            result.metrics[key] = correct.float().mean().item()
            result.settings[key] = self.settings(ctx, norm, eps, len(y), time.perf_counter() - start)
            # The headline point is "pgd" (compared per point with clean/autoattack/certified); curve
            # points keep their key so the sanity checks can compare neighbouring eps per point.
            result.per_example["pgd" if key == "pgd/acc" else key.removesuffix("/acc")] = correct
            if eps > 0:  # at eps 0 nothing is attacked: "robust" there is clean accuracy, measured exactly
                robust[key] = correct
        if robust:
            zero = zero_gradient_points(model, x, y, self.loss, ctx.batch_size)
            result.checks.append(stuck_points_check(robust, zero, self.loss))
            for key, mask in robust.items():
                result.settings[key]["robust_with_zero_gradient"] = int((mask & zero).sum())
        return result


def build(spec, cfg):
    return PGD(dict(spec), cfg)
