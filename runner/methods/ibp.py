"""IBP certified training: Gowal et al. (2018) and Shi et al. (2021, "fast certified training").

Per batch: eps_t follows a warm-up at 0 and a ramp (smooth or linear, updated every step) to
eps_train = eps_factor · threat.eps. The loss is κ·CE(f(x), y) + (1 − κ)·CE(−m(eps_t), y), where m are
the IBP lower bounds of the margins z_y − z_j (specification folded into the last layer) and the
true class sits at 0. κ: "gowal" goes kappa_start -> kappa_end over the ramp; "shi" is clean CE while
eps_t = 0 and pure robust CE afterwards. BatchNorm inside the bounds uses the clean batch's statistics
(the same ones the clean forward pass normalised with). Shi et al.'s components are config choices:
IBP initialisation (`ibp_init`), and the warm-up regulariser on bound tightness and ReLU balance with
weight reg_lambda·(1 − eps_t/eps_train) until the ramp ends (`reg_lambda: 0` turns it off). Gradient
clipping is the loop's `train.grad_clip`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runner import bounds
from runner.config import MethodConfig
from runner.layers import Normalize
from runner.methods.base import Method
from runner.precision import exact_fp32

RAMPS = ("smooth", "linear")
KAPPAS = ("shi", "gowal", "eps")
SMOOTH_MID = 0.25  # auto_LiRPA / CROWN-IBP SmoothedScheduler: polynomial up to 25% of the ramp
SMOOTH_POWER = 4.0


@dataclass
class Config(MethodConfig):
    name: str = "ibp"
    warmup_epochs: float = 3.0  # epochs at eps = 0 (clean training) before the ramp (method/ibp.yaml)
    ramp_epochs: float = 40.0  # epochs over which eps_t grows from 0 to eps_train
    ramp: str = "smooth"  # smooth (Gowal, CROWN-IBP, Shi) | linear
    eps_factor: float = 1.3  # eps_train = eps_factor · threat.eps (Gowal CIFAR, CROWN-IBP: 1.1; Shi: 1.0)
    # shi: clean CE while eps_t = 0, then robust only | gowal: kappa_start -> kappa_end linearly over the ramp
    # | eps: the same ends, following eps_t / eps_train (CROWN-IBP's train.py; it differs from gowal mid-ramp)
    kappa: str = "gowal"
    kappa_start: float = 1.0
    kappa_end: float = 0.5
    ibp_init: bool = True  # Shi et al.: weights ~ N(0, 2π/fan_in²) except the last layer's
    reg_lambda: float = 0.5  # Shi et al.'s warm-up regulariser weight; 0 turns it off
    reg_tol: float = 0.5
    reg_min_eps: float = 1e-6  # the regulariser's bounds during the eps = 0 warm-up use this eps
    val_batch_size: int = 500


def ramp_fraction(step: int, steps_per_epoch: int, warmup_epochs: float, ramp_epochs: float) -> float:
    """Fraction of the ramp reached at the batch with 0-based global index `step`: 0 up to and including the
    ramp's first batch, 1 from the batch after its last, as auto_LiRPA's SmoothedScheduler and DeepMind's
    schedules count (they evaluate the schedule at the 0-based batch index)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    ramp = round(ramp_epochs * steps_per_epoch)
    if step < warmup:
        return 0.0
    if ramp <= 0:
        return 1.0
    return min(1.0, (step - warmup) / ramp)


def smooth_ramp(fraction: float, mid: float = SMOOTH_MID, power: float = SMOOTH_POWER) -> float:
    """a·t^p up to `mid`, then the tangent line reaching 1 at t = 1 (slope-continuous)."""
    a = 1.0 / (mid**power + power * mid ** (power - 1) * (1 - mid))
    if fraction <= mid:
        return a * fraction**power
    return a * (mid**power + power * mid ** (power - 1) * (fraction - mid))


def eps_at(step: int, steps_per_epoch: int, m, eps_train: float) -> float:
    fraction = ramp_fraction(step, steps_per_epoch, m.warmup_epochs, m.ramp_epochs)
    shaped = smooth_ramp(fraction) if m.ramp == "smooth" else fraction
    return eps_train * min(1.0, shaped)


def kappa_at(step: int, steps_per_epoch: int, m, eps_t: float, eps_train: float) -> float:
    if m.kappa == "shi":
        return 1.0 if eps_t == 0 else 0.0
    if m.kappa == "eps":
        fraction = eps_t / eps_train if eps_train > 0 else 1.0
        return m.kappa_start + (m.kappa_end - m.kappa_start) * fraction
    fraction = ramp_fraction(step, steps_per_epoch, m.warmup_epochs, m.ramp_epochs)
    return m.kappa_start + (m.kappa_end - m.kappa_start) * fraction


def ibp_initialise(model: nn.Module) -> int:
    """Shi et al.'s IBP initialisation: every Linear/Conv weight but the last layer's ~ N(0, σ²) with
    σ = √(2π)/fan_in, which keeps the IBP radius roughly constant through depth. Returns the count.
    (The reference also halves the weights of a layer one step after a residual sum; the IBP presets'
    networks have no residual blocks, and that adjustment is not made here.)"""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
    return len(layers) - 1


def input_radius(model: nn.Module, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """r_0 of the tightness term: the input box's radius in the units the first weight layer sees. The
    reference normalises the data outside the model (its box is eps / std wide) and compares r_0 with
    radii measured after that normalisation, as every r_i here is; so the pixel-unit box goes through
    the model's Normalize layer first."""
    first = bounds.flatten_layers(model)[0]
    if isinstance(first, Normalize):
        return bounds.interval_step(first, *box, None)[1]
    return box[1]


def warmup_regulariser(input_radius: torch.Tensor, relu_inputs: list, tol: float) -> torch.Tensor:
    """Shi et al. (2021) L_tightness + L_relu, averaged over the ReLU layers.

    L_tightness = ReLU(tol − mean(r_0)/mean(r_i)) / tol penalises intervals that grow through depth
    (r_0: `input_radius`, the box after the input normalisation);
    L_relu = (ReLU(tol − ρ_mean) + ReLU(tol − ρ_var)) / tol, with ρ the (≤ 1) ratios between the
    mean and the spread of the centres of the active and of the inactive neurons, balances ReLU states.
    """
    zero = input_radius.new_zeros(())
    tightness, balance = zero, zero
    initial = input_radius.mean()
    for centre, radius in relu_inputs:
        tightness = tightness + F.relu(tol - initial / radius.mean().clamp_min(1e-12)) / tol
        active, inactive = (centre - radius > 0).to(centre.dtype), (centre + radius < 0).to(centre.dtype)
        # A layer with no inactive neuron gives an infinite term, skipped below as in the reference; one
        # with no active neuron (all dead) costs the full 2, a constant: its gradient is zero either way.
        spread = (centre - centre.mean()) ** 2
        mean_ratio = (centre * active).mean() / -(centre * inactive).mean()
        var_ratio = (spread * active).sum() / (spread * inactive).sum().clamp_min(1e-12)
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp_min(1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp_min(1e-12))
        term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(term):
            balance = balance + term
    return (tightness + balance) / max(1, len(relu_inputs))


class IBP(Method):
    select_on = "certified"
    bound_method = "ibp"

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        if m.ramp not in RAMPS:
            raise ValueError(f"method.ramp must be one of {RAMPS}, got {m.ramp!r}")
        if m.kappa not in KAPPAS:
            raise ValueError(f"method.kappa must be one of {KAPPAS}, got {m.kappa!r}")
        for key in ("warmup_epochs", "ramp_epochs", "eps_factor", "reg_lambda", "reg_tol"):
            if m[key] < 0:
                raise ValueError(f"method.{key} must be >= 0, got {m[key]}")
        for key in ("kappa_start", "kappa_end"):
            if not 0 <= m[key] <= 1:
                raise ValueError(f"method.{key} must be in [0, 1], got {m[key]}")
        if m.val_batch_size < 1:
            raise ValueError(f"method.val_batch_size must be a positive batch size, got {m.val_batch_size}")
        if cfg.threat.norm != "linf":
            raise ValueError(f"method={m.name} certifies linf balls only (threat.norm={cfg.threat.norm!r})")
        self.log_every = max(1, int(cfg.train.log_every))

    def schedule_warnings(self, steps_per_epoch, epochs):
        m = self.cfg.method
        last_step = steps_per_epoch * epochs - 1
        # A run that ends with the ramp's last batch (one step short of eps_train, as in the references)
        # has done its ramp.
        if ramp_fraction(last_step + 1, steps_per_epoch, m.warmup_epochs, m.ramp_epochs) >= 1:
            return []
        eps_train = m.eps_factor * float(self.cfg.threat.eps)
        if eps_train == 0:
            return []
        reached = eps_at(last_step, steps_per_epoch, m, eps_train)
        return [
            f"the eps ramp ends after epoch {m.warmup_epochs + m.ramp_epochs:g} (method.warmup_epochs + "
            f"method.ramp_epochs) but training stops after {epochs}: the last step trains at eps {reached:.4g}, "
            f"{reached / eps_train:.1%} of eps_train {eps_train:.4g}, so certificates at threat.eps will be few; "
            f"shorten the ramp or train longer"
        ]

    def setup(self, model):
        ok, reason = bounds.supports(model, self.bound_method)
        if not ok:
            raise bounds.UnsupportedModel(f"method={self.cfg.method.name} cannot train this model: {reason}")
        if self.cfg.method.ibp_init:
            ibp_initialise(model)

    def robust_bounds(self, model, x, y, eps, bn_stats, relu_inputs, step_ctx):
        """Margin lower bounds used by the robust loss (CROWN-IBP overrides this)."""
        return bounds.ibp_margin_bounds(model, x, y, eps, bn_stats=bn_stats, relu_inputs=relu_inputs), {}

    def loss(self, model, x, y, ctx):
        m = self.cfg.method
        eps_train = m.eps_factor * ctx.eps
        eps_t = eps_at(ctx.step, ctx.steps_per_epoch, m, eps_train)
        kappa = kappa_at(ctx.step, ctx.steps_per_epoch, m, eps_t, eps_train)
        logs = {"eps_t": eps_t, "kappa": kappa}
        loss, bn_stats = x.new_zeros(()), {}
        # The clean pass serves the clean CE (kappa > 0) and BatchNorm's batch statistics, which the bounds
        # normalise with. With neither (Shi's robust-only loss on a network without BatchNorm) it would
        # only be logged: a third of a plain step, skipped; except under several processes, where it is
        # DDP's forward that arms the gradient all-reduce (the bounds walk the unwrapped network).
        several = torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1)
        if kappa > 0 or bounds.uses_batch_statistics(model) or several:
            logits, bn_stats = bounds.forward_with_bn_stats(model, x)
            clean_loss = F.cross_entropy(logits, y)
            logs["clean_loss"] = clean_loss.detach()
            if kappa > 0:
                loss = kappa * clean_loss
        regularise = m.reg_lambda > 0 and eps_train > 0 and eps_t < eps_train
        relu_inputs = [] if regularise else None
        if kappa < 1:
            lower, extra = self.robust_bounds(model, x, y, eps_t, bn_stats, relu_inputs, ctx)
            robust_loss = bounds.robust_cross_entropy(lower, y)
            loss = loss + (1 - kappa) * robust_loss
            logs.update(extra, robust_loss=robust_loss.detach())
            logs["train_ibp_cert_acc"] = bounds.certified_mask(lower.detach(), y).float().mean()
        if regularise:
            # During the eps = 0 warm-up the intervals are points; the reference measures them at a tiny eps.
            reg_eps = eps_t if eps_t > 0 else m.reg_min_eps
            input_box = bounds.input_box(x, reg_eps)
            if eps_t == 0 or not relu_inputs:
                relu_inputs = []
                bounds.propagate(model, *input_box, bn_stats, relu_inputs)
            reg = warmup_regulariser(input_radius(model, input_box), relu_inputs, m.reg_tol)
            loss = loss + m.reg_lambda * (1 - eps_t / eps_train) * reg
            logs["reg_loss"] = reg.detach()
        if (ctx.step + 1) % self.log_every == 0:  # the steps the tracker records
            tightness = bounds.ibp_tightness(model, x, y, bn_stats)
            if tightness is not None:
                logs["tightness"] = tightness.mean()
        return loss, logs

    @torch.no_grad()
    @exact_fp32()  # a TF32 bound could certify a point fp32 does not: best.pt is chosen on these
    def validate(self, model, x, y, ctx):
        """IBP-certified accuracy at threat.eps on the validation split (what best.pt maximises)."""
        clean, certified, tight = [], [], []
        step = self.cfg.method.val_batch_size
        for start in range(0, len(y), step):
            xb, yb = x[start : start + step], y[start : start + step]
            clean.append(model(xb).argmax(1) == yb)
            lower = bounds.ibp_margin_bounds(model, xb, yb, ctx.eps)
            certified.append(bounds.certified_mask(lower, yb))
            tightness = bounds.ibp_tightness(model, xb, yb)
            if tightness is not None:
                tight.append(tightness)
        metrics = {
            "val/clean_acc": torch.cat(clean).float().mean().item(),
            "val/ibp_cert_acc": torch.cat(certified).float().mean().item(),
        }
        if tight:
            metrics["val/tightness"] = torch.cat(tight).mean().item()
        metrics["val/score"] = metrics["val/ibp_cert_acc"]
        return metrics


def build(cfg):
    return IBP(cfg)
