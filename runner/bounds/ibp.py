"""Interval bound propagation (Gowal et al. 2018) in centre/radius form.

An interval [c - r, c + r] goes through an affine map W as [Wc + b - |W|r, Wc + b + |W|r] (exact for one
layer), through ReLU end by end, and through reshapes and average pooling unchanged in form (pooling has
non-negative weights). With the margin specification folded into the last linear layer (elision) the
margins are bounded from the penultimate interval directly, which is never looser.
"""

import torch
import torch.nn.functional as F
from torch import nn

from runner.bounds.graph import (
    CHANNEL_AFFINE,
    POOLING,
    UnsupportedModel,
    channel_affine,
    channel_view,
    check_supported,
    layer_problem,
)
from runner.layers import Residual


def input_box(x: torch.Tensor, eps: float, norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """The L∞ box [max(x-eps, 0), min(x+eps, 1)] as (centre, radius)."""
    if norm != "linf":
        raise NotImplementedError(f"threat.norm={norm!r}: interval bounds and CROWN here certify linf balls only")
    if eps < 0:
        raise ValueError(f"threat.eps must be >= 0, got {eps}")
    lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    return (upper + lower) / 2, (upper - lower) / 2


def interval_step(layer: nn.Module, c: torch.Tensor, r: torch.Tensor, bn_stats: dict | None):
    """One non-container layer applied to the interval (c, r)."""
    if isinstance(layer, nn.Linear):
        return F.linear(c, layer.weight, layer.bias), F.linear(r, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return F.conv2d(c, layer.weight, layer.bias, **conv), F.conv2d(r, layer.weight.abs(), None, **conv)
    if isinstance(layer, CHANNEL_AFFINE):
        scale, shift = channel_affine(layer, bn_stats)
        scale, shift = channel_view(scale, c.dim()), channel_view(shift, c.dim())
        return c * scale + shift, r * scale.abs()
    if isinstance(layer, nn.ReLU):
        lower, upper = (c - r).relu(), (c + r).relu()
        return (upper + lower) / 2, (upper - lower) / 2
    if isinstance(layer, (nn.Flatten, *POOLING)):
        return layer(c), layer(r)
    if isinstance(layer, nn.Identity):
        return c, r
    raise TypeError(f"no interval rule for {type(layer).__name__}")


def propagate(module: nn.Module, c, r, bn_stats=None, relu_inputs: list | None = None):
    """The interval (c, r) through `module` (containers included). Each ReLU's input interval is
    appended to `relu_inputs` as (centre, radius) when a list is given (Shi et al.'s regulariser)."""
    if isinstance(module, nn.Sequential):
        for child in module:
            c, r = propagate(child, c, r, bn_stats, relu_inputs)
        return c, r
    if isinstance(module, Residual):
        c_main, r_main = propagate(module.main, c, r, bn_stats, relu_inputs)
        c_short, r_short = propagate(module.shortcut, c, r, bn_stats, relu_inputs)
        return c_main + c_short, r_main + r_short
    if isinstance(module, nn.ReLU) and relu_inputs is not None:
        relu_inputs.append((c, r))
    return interval_step(module, c, r, bn_stats)


def margin_spec(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """C[b, j] = e_{y_b} - e_j: row j bounds z_y - z_j. Row y is zero, so its margin bound is exactly 0
    and -bounds are the worst-case logits with the true class at 0."""
    eye = torch.eye(num_classes, device=y.device, dtype=dtype)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def ibp_margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    bn_stats: dict | None = None,
    elide: bool = True,
    relu_inputs: list | None = None,
) -> torch.Tensor:
    """Lower bounds [B, K] of z_y - z_j over the eps-box, column y = 0."""
    layers = check_supported(model, "ibp")
    c, r = input_box(x, eps, norm)
    if not elide:
        for layer in layers:
            c, r = propagate(layer, c, r, bn_stats, relu_inputs)
        lower, upper = c - r, c + r
        return (lower.gather(1, y[:, None]) - upper).scatter(1, y[:, None], 0.0)
    for layer in layers[:-1]:
        c, r = propagate(layer, c, r, bn_stats, relu_inputs)
    last = layers[-1]
    spec = margin_spec(y, last.out_features, last.weight.dtype)
    weight = spec @ last.weight  # [B, K, hidden]: the specification folded into the last layer
    centre = (weight @ c.unsqueeze(-1)).squeeze(-1)
    if last.bias is not None:
        centre = centre + spec @ last.bias
    radius = (weight.abs() @ r.unsqueeze(-1)).squeeze(-1)
    return centre - radius


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "linf", bn_stats=None):
    """(lower, upper) of the model's outputs over the eps-box (no specification)."""
    problem = layer_problem(model, "ibp")
    if problem:
        raise UnsupportedModel(problem)
    c, r = propagate(model, *input_box(x, eps, norm), bn_stats)
    return c - r, c + r
