"""Sanity checks of a robustness evaluation (REFERENCES.md, "Evaluation protocol"), recorded in
results.json `checks` with a detail line each; a failing check is flagged, never hidden.

Put it last in a suite: it reads what the earlier evaluators measured (metrics and per-point masks)
and runs its own small probes on the first `n_examples` points:
- robust accuracy ≤ clean accuracy for every attack and certificate;
- accuracy does not rise with eps (the PGD curve, or a probe at 0.5/1/2 × eps), with more steps, or
  with restarts (exact: the first restart is the single run, each point keeps its worst case);
- at a very large eps (the whole image box by default) robust accuracy falls to ≈ 0;
- black-box Square must not beat the white-box attacks (read from AutoAttack's cascade when it ran,
  otherwise the package's Square on the points PGD left robust);
- AutoAttack at least as strong as PGD, per point;
- input gradients neither zero nor non-finite; perturbations inside the ball and [0, 1];
- repeated forward passes give the same logits (no randomised defence evaluated as deterministic).

Rises are judged per point (paired): with b points robust only under the stronger attack and c only
under the weaker one, a rise b − c above 1.96·√(b + c) (McNemar, 95%) fails. A deliberately masked
model (input quantisation) fails several of these; an honest adversarially trained one passes all.
"""

import math
import re
import time

import torch

from runner.attacks import model_mode, per_example_ce, predict
from runner.evaluators.base import EvalResult, Evaluator, check_keys
from runner.evaluators.pgd import input_gradients, margin_loss, parse_eps, pgd_correct, positive_int, spec_error
from runner.tracking import log

KEYS = {
    "name",
    "n_examples",
    "steps",
    "weak_steps",
    "restarts",
    "large_eps",
    "large_eps_max_acc",
    "square_queries",
    "zero_grad_max_fraction",
    "saturated_grad_max_fraction",
    "forward_passes",
}
CURVE_FACTORS = (0.5, 1.0, 2.0)
SQUARE_RELATIVE_TOLERANCE = 0.002  # AutoAttack's own flag: Square lowering robust accuracy by > 0.2%


def check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def not_rising(
    name: str,
    weaker: torch.Tensor,
    stronger: torch.Tensor,
    weak_label: str,
    strong_label: str,
    exact: bool = False,
) -> dict:
    """Accuracy under the stronger attack must not exceed that under the weaker one (paired per point)."""
    n = min(len(weaker), len(stronger))
    weaker, stronger = weaker[:n].cpu().bool(), stronger[:n].cpu().bool()
    only_strong = int((stronger & ~weaker).sum())  # points the weaker attack broke and the stronger missed
    only_weak = int((weaker & ~stronger).sum())
    rise = only_strong - only_weak
    allowed = 0.0 if exact else 1.96 * math.sqrt(only_strong + only_weak)
    rule = "exact: must be <= 0" if exact else f"allowed {allowed:.1f} (McNemar 95%)"
    return check(
        name,
        rise <= allowed,
        (
            f"{strong_label} {stronger.float().mean().item():.4f} vs "
            f"{weak_label} {weaker.float().mean().item():.4f} on {n} points; "
            f"{only_strong} points survive {strong_label} but not {weak_label}, {only_weak} the "
            f"reverse: rise {rise} points, {rule}"
        ),
    )


def square_check(fooled: int, n: int, white_box: str) -> dict:
    """`fooled`: points Square broke among those the white-box attacks left robust, out of n evaluated."""
    allowed = max(1, math.floor(SQUARE_RELATIVE_TOLERANCE * n))
    return check(
        "Square (black-box) does not beat the white-box attacks",
        fooled <= allowed,
        (
            f"Square fooled {fooled} of {n} points that {white_box} left robust; allowed {allowed} "
            f"(AutoAttack flags a drop above {SQUARE_RELATIVE_TOLERANCE:.1%}; one point is attack noise)"
        ),
    )


def robust_below_clean(per_example: dict) -> dict | None:
    """Every point an earlier evaluator counts robust or certified (at any eps) is classified correctly,
    compared point by point on the points both evaluated (a subset is a prefix of one fixed order)."""
    clean = per_example.get("clean")
    robust = {k: v for k, v in per_example.items() if k != "clean"}
    if clean is None or not robust:
        return None
    from runner.evaluate import prefix_violations

    above = {}
    for name, mask in robust.items():
        violations, n = prefix_violations(mask, clean)
        if violations:
            above[name] = f"{name}: {violations} of {n}"
    detail = (
        "robust but misclassified: " + ", ".join(above.values())
        if above
        else f"all {len(robust)} robust/certified results hold only on correctly classified points"
    )
    return check("robust accuracy <= clean accuracy per point", not above, detail)


CURVE_NAME = re.compile(r"^pgd(?:/(linf|l2))?/eps_([0-9.eE+-]+)$")


def curve_masks(per_example: dict, threat_norm: str, threat_eps: float) -> dict:
    """{norm: [(eps, mask)] sorted by eps} from the PGD evaluator's per-point masks."""
    curves: dict = {}
    for name, mask in per_example.items():
        if name == "pgd":
            curves.setdefault(threat_norm, []).append((threat_eps, mask))
            continue
        match = CURVE_NAME.match(name)
        if match:
            curves.setdefault(match.group(1) or threat_norm, []).append((float(match.group(2)), mask))
    return {norm: sorted(points, key=lambda p: p[0]) for norm, points in curves.items()}


def curve_checks(curves: dict, source: str) -> list[dict]:
    checks = []
    for norm, points in curves.items():
        if len(points) < 2:
            continue
        worst, details = None, []
        for (eps_a, mask_a), (eps_b, mask_b) in zip(points, points[1:]):
            result = not_rising("", mask_a, mask_b, f"eps {eps_a:.4g}", f"eps {eps_b:.4g}")
            details.append(result)
            if worst is None or (not result["passed"] and worst["passed"]):
                worst = result
        failed = [d for d in details if not d["passed"]]
        eps_text = ", ".join(f"{e:.4g}" for e, _ in points)
        accs = ", ".join(f"{m.float().mean().item():.4f}" for _, m in points)
        detail = f"{source} {norm} at eps [{eps_text}]: acc [{accs}]" + (
            f"; FAILED: {failed[0]['detail']}" if failed else "; every neighbour pair within noise"
        )
        checks.append(check(f"accuracy does not rise with eps ({norm})", not failed, detail))
    return checks


def gradient_check(model, x, y, zero_max: float, saturated_max: float) -> dict:
    """Margin gradients (which do not saturate) must be non-zero and finite; cross-entropy gradients
    that vanish through softmax saturation are reported and fail only above `saturated_max`."""
    with model_mode(model, "eval"):
        ce = input_gradients(model, x, y, per_example_ce)
        margin = input_gradients(model, x, y, margin_loss)
    n = len(y)
    nonfinite = int((~torch.isfinite(ce).all(1) | ~torch.isfinite(margin).all(1)).sum())
    zero_margin = int((margin.abs().sum(1) == 0).sum())
    zero_ce = int((ce.abs().sum(1) == 0).sum())
    passed = nonfinite == 0 and zero_margin <= zero_max * n and zero_ce <= saturated_max * n
    return check(
        "input gradients are non-zero and finite",
        passed,
        (
            f"{nonfinite} of {n} points with non-finite gradients; "
            f"{zero_margin} with an all-zero margin-loss gradient "
            f"(allowed {zero_max:.0%}: a piecewise-constant or quantising model); "
            f"{zero_ce} with an all-zero cross-entropy gradient "
            f"(softmax saturation, allowed {saturated_max:.0%}); mean |grad| "
            f"{margin.abs().mean().item():.3g}"
        ),
    )


def ball_check(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, label: str) -> dict:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    largest = size.max().item() if len(size) else 0.0
    low, high = x_adv.min().item(), x_adv.max().item()
    tolerance = 1e-6 + 1e-6 * eps
    passed = largest <= eps + tolerance and low >= 0.0 and high <= 1.0 and bool(torch.isfinite(x_adv).all())
    return check(
        "perturbations inside the ball and [0,1]",
        passed,
        (
            f"{label}: largest {norm} perturbation {largest:.6g} (eps {eps:.6g}); adversarial inputs in "
            f"[{low:.4g}, {high:.4g}]"
        ),
    )


@torch.no_grad()
def randomness_check(model, x, passes: int) -> dict:
    with model_mode(model, "eval"):
        outputs = [model(x) for _ in range(passes)]
    largest = max((outputs[0] - o).abs().max().item() for o in outputs[1:])
    scale = max(outputs[0].abs().max().item(), 1.0)
    same_predictions = all(torch.equal(outputs[0].argmax(1), o.argmax(1)) for o in outputs[1:])
    passed = same_predictions and largest <= 1e-5 * scale
    return check(
        "forward passes are deterministic",
        passed,
        (
            f"{passes} eval-mode passes on {len(x)} points: largest logit difference {largest:.3g} "
            f"(allowed {1e-5 * scale:.3g}), predictions {'identical' if same_predictions else 'CHANGE'}; "
            f"a randomised model needs EOT attacks (AutoAttack version='rand')"
        ),
    )


def square_fooled(model, x, y, robust, *, eps, norm, queries, seed) -> int:
    """The package's Square attack on the points still robust; returns how many it breaks."""
    from pyautoattack.square import SquareAttack

    from runner.evaluators.autoattack import PACKAGE_NORM

    index = robust.nonzero().flatten().to(x.device)
    if len(index) == 0:
        return 0
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), model_mode(model, "eval"):
        attack = SquareAttack(
            model,
            p_init=0.8,
            n_queries=queries,
            eps=eps,
            norm=PACKAGE_NORM[norm],
            n_restarts=1,
            seed=seed,
            verbose=False,
            device=x.device,
            resc_schedule=False,
        )
        x_adv = attack.perturb(x[index], y[index])
        return int((predict(model, x_adv) != y[index]).sum())


class Sanity(Evaluator):
    name = "sanity"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "sanity")
        self.n_examples = positive_int(spec, "sanity", "n_examples", 200)
        self.steps = positive_int(spec, "sanity", "steps", 50)
        self.weak_steps = positive_int(spec, "sanity", "weak_steps", 10)
        self.restarts = positive_int(spec, "sanity", "restarts", 3)
        if self.restarts < 2 or self.weak_steps >= self.steps:
            raise spec_error(
                "sanity", "restarts", "must be >= 2 and weak_steps < steps (they are comparisons)"
            )
        self.square_queries = positive_int(spec, "sanity", "square_queries", 1000)
        self.forward_passes = positive_int(spec, "sanity", "forward_passes", 3)
        if self.forward_passes < 2:
            raise spec_error("sanity", "forward_passes", f"must be >= 2, got {self.forward_passes}")
        self.large_eps = (
            parse_eps(spec["large_eps"], "sanity", "large_eps") if spec.get("large_eps") else None
        )
        self.fractions = {}
        for key, default in (
            ("large_eps_max_acc", 0.02),
            ("zero_grad_max_fraction", 0.0),
            ("saturated_grad_max_fraction", 0.1),
        ):
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise spec_error("sanity", key, f"must be a fraction in [0, 1], got {value!r}")
            self.fractions[key] = float(value)

    def __call__(self, model, x, y, ctx):
        began = time.perf_counter()
        n = min(self.n_examples, len(y))
        xs, ys = x[:n], y[:n]
        norm, eps = ctx.norm, ctx.eps
        checks = []
        probe = {"norm": norm, "seed": ctx.seed, "batch_size": ctx.batch_size, "alpha": None, "loss": "ce"}

        below = robust_below_clean(ctx.per_example)
        if below:
            checks.append(below)

        weak = pgd_correct(model, xs, ys, eps=eps, steps=self.weak_steps, restarts=1, **probe)
        strong, x_adv = pgd_correct(
            model, xs, ys, eps=eps, steps=self.steps, restarts=1, return_adversarial=True, **probe
        )
        restarted = pgd_correct(
            model, xs, ys, eps=eps, steps=self.weak_steps, restarts=self.restarts, **probe
        )
        checks.append(
            not_rising(
                "accuracy does not rise with more steps",
                weak,
                strong,
                f"PGD-{self.weak_steps}",
                f"PGD-{self.steps}",
            )
        )
        checks.append(
            not_rising(
                "accuracy does not rise with restarts",
                weak,
                restarted,
                f"PGD-{self.weak_steps}",
                f"PGD-{self.weak_steps}x{self.restarts} restarts",
                exact=True,
            )
        )

        curves = curve_masks(ctx.per_example, norm, eps)
        if any(len(points) >= 2 for points in curves.values()):
            checks += curve_checks(curves, "PGD evaluator")
        else:
            own = [
                (
                    f * eps,
                    weak
                    if f == 1.0
                    else pgd_correct(model, xs, ys, eps=f * eps, steps=self.weak_steps, restarts=1, **probe),
                )
                for f in CURVE_FACTORS
            ]
            checks += curve_checks({norm: own}, f"probe PGD-{self.weak_steps} on {n} points,")

        large = (
            self.large_eps
            if self.large_eps is not None
            else (1.0 if norm == "linf" else math.sqrt(xs[0].numel()))
        )  # the whole [0,1] box
        large_correct = pgd_correct(model, xs, ys, eps=large, steps=self.steps, restarts=1, **probe)
        large_acc = large_correct.float().mean().item()
        limit = self.fractions["large_eps_max_acc"]
        checks.append(
            check(
                "robust accuracy ≈ 0 at a very large eps",
                large_acc <= limit,
                (
                    f"PGD-{self.steps} at {norm} eps {large:.4g} (the whole image box): "
                    f"acc {large_acc:.4f} on {n} points, allowed {limit:.2f}; "
                    f"higher means the attack cannot move the prediction (masked gradients)"
                ),
            )
        )

        if "autoattack" in ctx.per_example:
            checks.append(
                not_rising(
                    "AutoAttack at least as strong as PGD",
                    ctx.per_example["pgd"],
                    ctx.per_example["autoattack"],
                    "PGD",
                    "AutoAttack",
                )
                if "pgd" in ctx.per_example
                else check("AutoAttack at least as strong as PGD", True, "no PGD result to compare")
            )
        if "autoattack/after_square/acc" not in ctx.metrics:  # AutoAttack's cascade already checked Square
            fooled = square_fooled(
                model, xs, ys, strong, eps=eps, norm=norm, queries=self.square_queries, seed=ctx.seed
            )
            checks.append(
                square_check(fooled, n, f"PGD-{self.steps} (Square with {self.square_queries} queries)")
            )

        checks.append(
            gradient_check(
                model,
                xs,
                ys,
                self.fractions["zero_grad_max_fraction"],
                self.fractions["saturated_grad_max_fraction"],
            )
        )
        checks.append(ball_check(x_adv, xs, eps, norm, f"PGD-{self.steps} probe"))
        checks.append(randomness_check(model, xs, self.forward_passes))
        for item in checks:
            item["name"] = f"sanity: {item['name']}"
        log.debug(f"sanity probes on the first {n} points took {time.perf_counter() - began:.1f}s")
        return EvalResult(checks=checks)


def build(spec, cfg):
    return Sanity(dict(spec), cfg)
