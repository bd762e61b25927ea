"""Adversarial weight perturbation (Wu et al. 2020, csdongxian/AWP) around any method's loss: `method.awp=true`.

Per step, after `awp_warmup` epochs:
1. The method's adversarial batch is solved once, at w, on the model itself (a train-mode attack updates
   BatchNorm's running statistics, as the reference's does). g = ∇L(w) on it: the reference takes this
   gradient on a proxy copy of the model, so BatchNorm's running statistics do not see this pass.
2. Each weight tensor of two or more dimensions (convolution and linear weights; not biases, not BatchNorm)
   moves by v_l = γ·‖w_l‖·g_l/‖g_l‖: a step of size γ relative to the layer's own norm.
3. g' = ∇L(w + v) on the same adversarial batch; the base optimizer steps at w + v with g' (clipped, when
   train.grad_clip is set), then v is subtracted, as the reference does.

γ: method.awp_gamma, or the method's reference value (`Method.awp_gamma`: 0.01 for AT, 0.005 for TRADES).
SAM (`method.sam`) is the global-ball relative of this rule and cannot be combined with it.
"""

import dataclasses

import torch
from torch import nn

from runner.update import Update, frozen_bn_statistics, is_finite, loggable, loss_context

# The reference's guard against a zero gradient: v = 0 where g = 0.
NORM_FLOOR = 1e-20


def awp_gamma(cfg, method=None) -> float:
    """method.awp_gamma, or the reference value for the run's method when it is null."""
    gamma = cfg.method.get("awp_gamma")
    if gamma is not None:
        return float(gamma)
    if method is None:
        from runner.methods import build_method

        method = build_method(cfg)
    return float(method.awp_gamma)


def perturbed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The tensors AWP moves: trainable weights of two or more dimensions that received a gradient."""
    return [p for p in model.parameters() if p.requires_grad and p.grad is not None and p.dim() > 1]


@torch.no_grad()
def layerwise_perturbation(weights: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """v_l = γ·‖w_l‖·g_l/‖g_l‖ from the gradients currently stored in `.grad`."""
    return [
        w.grad * (gamma * torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(w.grad) + NORM_FLOOR))
        for w in weights
    ]


class AWPUpdate(Update):
    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(cfg, model, optimizer)
        self.cfg = cfg
        self.warmup_epochs = int(cfg.method.get("awp_warmup", 0))
        self.gamma = None  # resolved on the first step, from the method object the loop passes in

    def schedule_warnings(self, epochs: int) -> list[str]:
        if self.warmup_epochs < epochs:
            return []
        return [f"method.awp_warmup={self.warmup_epochs} plain epochs cover the whole run (train.epochs={epochs}): "
                f"AWP never turns on; lower method.awp_warmup or train longer"]

    def __call__(self, model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, ctx) -> dict:
        if ctx.epoch < self.warmup_epochs:
            return super().__call__(model, method, x, y, ctx)
        if self.gamma is None:
            self.gamma = awp_gamma(self.cfg, method)
        self.optimizer.zero_grad(set_to_none=True)
        with loss_context(self.precision, x.device.type):  # where the loss would have solved it
            method.adversarial(model, x, y, ctx)
        reuse = dataclasses.replace(ctx, reuse_attack=True)
        # Unlike SAM's, this gradient is all-reduced under DDP: the reference's proxy sees the whole batch,
        # and every rank must move its weights by the same v for the subtraction below to agree.
        with frozen_bn_statistics(model):
            loss, logs = self._forward(model, method, x, y, reuse)
            if not is_finite(loss):
                return {**loggable(logs, loss), "nonfinite": 1.0}
            loss.backward()
        weights = perturbed_weights(model)
        perturbation = layerwise_perturbation(weights, self.gamma)
        originals = [w.data for w in weights]  # kept by reference: w + v goes into fresh tensors
        with torch.no_grad():
            for w, v in zip(weights, perturbation):
                w.data = w.data + v
        self.optimizer.zero_grad(set_to_none=True)
        stepped = False
        try:
            second_loss, _ = self._forward(model, method, x, y, reuse)
            out = {**loggable(logs, loss), "awp/loss_perturbed": second_loss.detach().float()}
            if not is_finite(second_loss):
                self.optimizer.zero_grad(set_to_none=True)
                return {**out, "nonfinite": 1.0}
            second_loss.backward()
            out.update(self._clip(model))
            self.optimizer.step()
            stepped = True
        finally:
            with torch.no_grad():
                for w, v, original in zip(weights, perturbation, originals):
                    # After the step: w + v - lr·u - v, the reference's order (its weight decay sees w + v).
                    # Without one (a non-finite loss, an error): the originals, bit for bit.
                    if stepped:
                        w.sub_(v)
                    else:
                        w.data = original
        method.after_step(model, x)
        return out
