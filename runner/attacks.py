"""The one PGD: used by every training method and by every evaluator.

Everything is in [0, 1] pixel units (normalisation is the model's first layer), so one epsilon serves
attacks, bounds and verifiers. The model's train/eval mode is the caller's choice (see `model_mode`).
"""

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runner import compiled
from runner.compiled import flat

NORMS = ("linf", "l2")
# The loops below save ATen passes of ~0.12 ms each on a CIFAR batch (128 x 3 x 32 x 32: 393,216 elements);
# their first call costs a process ~0.7 s of CPU (numba's import and cache load), which only batches this
# large win back. A digits batch (4,096 elements) stays on ATen.
LOOP_MIN_ELEMENTS = 1 << 16


def default_alpha(eps: float, steps: int) -> float:
    """Madry et al.'s 2.5·ε/k, which lets k steps cross the ball; FGSM-RS (Wong et al.) uses 1.25·ε."""
    return 1.25 * eps if steps == 1 else 2.5 * eps / steps


def per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against `t`."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Into the eps-ball around 0, then so that x + delta lies in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


@functools.cache
def _linf_loops():
    """One-pass CPU loops (numba) for the L∞ step and start, or None without numba. Each is the ATen
    formulation (`_ascend`, `project`, `random_start`) in its float32 operations and order, so the bits
    are the same (tested); ATen makes eight passes over the batch per step, and an attack step on a small
    network spends ~10% of its time in them."""
    if compiled.numba_module() is None:
        return None

    @compiled.jit
    def clamp(value, low, high):  # torch.clamp's order: NaN passes through
        value = low if value < low else value
        return high if value > high else value

    @compiled.jit
    def ascend_project(delta, grad, x, alpha, eps, out):
        zero, one = np.float32(0.0), np.float32(1.0)
        for i in range(x.size):
            g = grad[i]
            sign = one if g > zero else (-one if g < zero else zero)
            moved = x[i] + clamp(delta[i] + alpha * sign, -eps, eps)
            out[i] = clamp(moved, zero, one) - x[i]

    @compiled.jit
    def uniform_start(uniform, x, eps, out):
        zero, one, two = np.float32(0.0), np.float32(1.0), np.float32(2.0)
        for i in range(x.size):
            moved = x[i] + clamp((uniform[i] * two - one) * eps, -eps, eps)
            out[i] = clamp(moved, zero, one) - x[i]

    return ascend_project, uniform_start


def _use_loops(*tensors: torch.Tensor) -> bool:
    return (
        tensors[0].numel() >= LOOP_MIN_ELEMENTS
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and _linf_loops() is not None
    )


def _step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float, norm: str):
    """project(_ascend(delta, grad)): one loop for L∞ on a CPU."""
    if norm == "linf" and _use_loops(delta, grad, x):
        out = torch.empty_like(x)
        _linf_loops()[0](flat(delta), flat(grad), flat(x), np.float32(alpha), np.float32(eps), flat(out))
        return out
    return project(_ascend(delta, grad, alpha, norm), x, eps, norm)


def random_start(x: torch.Tensor, eps: float, norm: str, init: str, init_std: float, generator) -> torch.Tensor:
    if init == "zero":
        return torch.zeros_like(x)
    if init == "normal":  # TRADES: x + 0.001·N(0, I)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * init_std
    elif norm == "linf":
        uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if _use_loops(uniform, x):
            start = torch.empty_like(x)
            _linf_loops()[1](flat(uniform), flat(x), np.float32(eps), flat(start))
            return start
        noise = (uniform * 2 - 1) * eps
    else:  # uniform direction, radius r·eps with r ~ U(0, 1)
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        noise = direction / _flat_norm(direction) * (radius * eps).view(-1, *([1] * (x.dim() - 1)))
    return project(noise, x, eps, norm)


def _ascend(delta: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta + alpha * grad.sign()
    # Zero gradients stay zero instead of becoming NaN (the norm is clamped away from 0).
    return delta + alpha * grad / _flat_norm(grad)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    alpha: float | None = None,
    restarts: int = 1,
    init: str = "uniform",
    init_std: float = 0.001,
    loss_fn=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on `loss_fn(model(x'), y)` (per-example, default CE); returns x'.

    init: "uniform" (in the ball), "normal" (x + init_std·N(0, I), TRADES) or "zero".
    With restarts > 1, each example keeps its own worst case: a misclassifying perturbation beats
    one that is not, and among equals the higher final loss wins, never one choice per batch.
    The returned x' always lies in the eps-ball around x and in [0, 1].
    """
    if norm not in NORMS:
        raise ValueError(f"threat.norm must be one of {NORMS}, got {norm!r}")
    if eps <= 0 or steps <= 0:
        return x.detach().clone()
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    loss_fn = loss_fn or per_example_ce
    x = x.detach()
    best_x, best_loss, best_wrong = x.clone(), None, None
    for _ in range(restarts):
        delta = random_start(x, eps, norm, init, init_std, generator)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = _step(delta.detach(), grad, x, alpha, eps, norm)
        x_adv = (x + delta).detach()
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
            loss, wrong = loss_fn(logits, y), logits.argmax(1) != y
        if best_loss is None:
            best_x, best_loss, best_wrong = x_adv, loss, wrong
            continue
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
        best_loss = torch.where(better, loss, best_loss)
        best_wrong = best_wrong | wrong
    return best_x


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str):
    """Temporarily put the model in "train" or "eval" mode (BN behaviour during attack generation)."""
    training = mode == "train"
    if model.training == training and all(module.training == training for module in model.modules()):
        yield model  # already there: nothing to switch, nothing to restore (the common case in evaluation)
        return
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    return (predict(model, x, batch_size) == y).float().mean().item()
