"""CROWN (Zhang et al. 2018): a backward pass of linear bounds through a feed-forward network.

A lower bound of A·z at some node is carried backwards as A'·x + bias: affine layers are transposed
exactly, each ReLU is replaced by one of two linear functions depending on the sign of the coefficient
(the chord above, the adaptive line y = x or y = 0 below, whichever leaves the smaller area), and the
input box is concretised at the end. The ReLU relaxations need the bounds of their inputs: IBP's
(CROWN-IBP, Zhang et al. 2020) or CROWN's own, computed layer by layer (full CROWN).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from runner.bounds.graph import CHANNEL_AFFINE, LINEAR, POOLING, channel_affine, channel_view, check_supported
from runner.bounds.ibp import input_box, interval_step, margin_spec

# Rows of an identity specification bounded at once when refining intermediate bounds (memory cap).
MAX_SPEC_ELEMENTS = 2**25
# A convolution whose dense matrix has at most this many entries is transposed as a matrix product:
# far faster than conv_transpose2d on the many small specification rows of full CROWN.
MAX_DENSE_CONV = 2**22


def _contract(coeffs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum over every node dimension of coeffs [B, S, ...] * values (broadcast) -> [B, S]."""
    return (coeffs * values).flatten(2).sum(-1)


def _conv_transpose(layer: nn.Conv2d, coeffs: torch.Tensor, in_shape) -> torch.Tensor:
    batch, rows, *out_shape = coeffs.shape
    padding = (0, 0) if layer.padding == "valid" else layer.padding
    # The input size a strided convolution came from is ambiguous; output_padding restores it.
    reach = [layer.dilation[d] * (layer.kernel_size[d] - 1) + 1 for d in range(2)]
    produced = [(out_shape[1 + d] - 1) * layer.stride[d] - 2 * padding[d] + reach[d] for d in range(2)]
    output_padding = [in_shape[1 + d] - produced[d] for d in range(2)]
    flat = coeffs.reshape(batch * rows, *out_shape)
    back = F.conv_transpose2d(
        flat, layer.weight, None, layer.stride, padding, output_padding, layer.groups, layer.dilation
    )
    return back.reshape(batch, rows, *in_shape)


def dense_convolutions(layers, in_shapes) -> dict:
    """{index: W [out, in]} for the convolutions small enough to hold as matrices (differentiable in
    the weights, so CROWN-IBP training can use them)."""
    dense = {}
    for index, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        in_shape, out_shape = in_shapes[index], in_shapes[index + 1]
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        if n_in * n_out > MAX_DENSE_CONV:
            continue
        basis = torch.eye(n_in, dtype=layer.weight.dtype, device=layer.weight.device).view(n_in, *in_shape)
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        dense[index] = F.conv2d(basis, layer.weight, None, **conv).reshape(n_in, n_out).t()
    return dense


def _transpose(layer, coeffs, bias, in_shape, bn_stats, dense=None):
    """Move A·layer(z) + bias back to A'·z + bias' for a layer that is affine in z."""
    if isinstance(layer, nn.Linear):
        if layer.bias is not None:
            bias = bias + _contract(coeffs, layer.bias)
        return coeffs @ layer.weight, bias
    if isinstance(layer, nn.Conv2d):
        if layer.bias is not None:
            bias = bias + coeffs.sum((3, 4)) @ layer.bias
        if dense is not None:
            return (coeffs.flatten(2) @ dense).view(*coeffs.shape[:2], *in_shape), bias
        return _conv_transpose(layer, coeffs, in_shape), bias
    if isinstance(layer, CHANNEL_AFFINE):
        scale, shift = channel_affine(layer, bn_stats)
        ndim = coeffs.dim()
        bias = bias + _contract(coeffs, channel_view(shift, ndim, leading=2))
        return coeffs * channel_view(scale, ndim, leading=2), bias
    if isinstance(layer, nn.Flatten):
        return coeffs.reshape(*coeffs.shape[:2], *in_shape), bias
    if isinstance(layer, POOLING):
        batch, rows = coeffs.shape[:2]
        # Pooling is linear without parameters: its transpose is its vector-Jacobian product.
        _, pullback = torch.func.vjp(layer, coeffs.new_zeros(batch * rows, *in_shape))
        (back,) = pullback(coeffs.reshape(batch * rows, *coeffs.shape[2:]))
        return back.view(batch, rows, *in_shape), bias
    if isinstance(layer, nn.Identity):
        return coeffs, bias
    raise TypeError(f"no CROWN rule for {type(layer).__name__}")


def relu_relaxation(lower: torch.Tensor, upper: torch.Tensor):
    """(lower slope, upper slope, upper intercept) of the linear bounds of ReLU on [lower, upper]."""
    active = (lower >= 0).to(lower.dtype)
    unstable = (lower < 0) & (upper > 0)
    upper_slope = torch.where(unstable, upper / (upper - lower).clamp_min(1e-12), active)
    upper_intercept = torch.where(unstable, -lower * upper_slope, torch.zeros_like(lower))
    # Adaptive lower line: y = x when the interval is mostly positive, else y = 0 (smaller area).
    lower_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active)
    return lower_slope, upper_slope, upper_intercept


def _relax_relu(coeffs, bias, lower, upper):
    lower_slope, upper_slope, upper_intercept = (t.unsqueeze(1) for t in relu_relaxation(lower, upper))
    negative = coeffs.clamp(max=0)
    # Per-example contraction as a batched matrix product (no [B, S, N] temporary).
    bias = bias + (negative.flatten(2) @ upper_intercept.flatten(2).transpose(1, 2)).squeeze(-1)
    # positive·lower + negative·upper = coeffs·lower + negative·(upper − lower)
    return coeffs * lower_slope + negative * (upper_slope - lower_slope), bias


@dataclass
class Walk:
    """What a backward pass needs: the layers, the shape of each layer's input (and the output's), the
    input box, BatchNorm statistics, dense convolution matrices and the ReLU input bounds so far."""

    layers: list
    in_shapes: list
    box: tuple
    bn_stats: dict | None
    dense: dict
    relu_bounds: dict = field(default_factory=dict)


def backward_lower_bound(walk: Walk, end: int, coeffs: torch.Tensor) -> torch.Tensor:
    """Lower bound [B, S] of coeffs·(layers[:end](x)) over the box; coeffs is [B, S, *node shape]."""
    bias = coeffs.new_zeros(coeffs.shape[:2])
    for index in range(end - 1, -1, -1):
        layer = walk.layers[index]
        if isinstance(layer, nn.ReLU):
            coeffs, bias = _relax_relu(coeffs, bias, *walk.relu_bounds[index])
        else:
            dense = walk.dense.get(index)
            coeffs, bias = _transpose(layer, coeffs, bias, walk.in_shapes[index], walk.bn_stats, dense)
    centre, radius = (t.flatten(1).unsqueeze(-1) for t in walk.box)
    flat = coeffs.flatten(2)
    return bias + (flat @ centre).squeeze(-1) - (flat.abs() @ radius).squeeze(-1)


def _refine(walk: Walk, end: int, lower: torch.Tensor, upper: torch.Tensor):
    """Tighten the interval of node `end` with CROWN, for the neurons unstable in some example."""
    batch, shape = lower.shape[0], lower.shape[1:]
    flat_lower, flat_upper = lower.flatten(1).clone(), upper.flatten(1).clone()
    unstable = ((flat_lower < 0) & (flat_upper > 0)).any(0).nonzero().squeeze(1)
    if unstable.numel() == 0:
        return lower, upper
    widest = max(math.prod(s) for s in walk.in_shapes[: end + 1])
    chunk = max(1, MAX_SPEC_ELEMENTS // (2 * batch * widest))
    for start in range(0, unstable.numel(), chunk):
        neurons = unstable[start : start + chunk]
        rows = torch.zeros(len(neurons), math.prod(shape), dtype=lower.dtype, device=lower.device)
        rows[torch.arange(len(neurons)), neurons] = 1.0
        spec = torch.cat([rows, -rows]).view(-1, *shape).unsqueeze(0).expand(batch, -1, *shape)
        bound = backward_lower_bound(walk, end, spec)
        new_lower, new_upper = bound[:, : len(neurons)], -bound[:, len(neurons) :]
        flat_lower[:, neurons] = torch.maximum(flat_lower[:, neurons], new_lower)
        flat_upper[:, neurons] = torch.minimum(flat_upper[:, neurons], new_upper)
    return flat_lower.view(batch, *shape), flat_upper.view(batch, *shape)


def crown_margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    bn_stats: dict | None = None,
    intermediate: str = "crown",
) -> torch.Tensor:
    """Lower bounds [B, K] of z_y - z_j over the eps-box by CROWN, column y = 0.

    intermediate: "ibp" (CROWN-IBP: ReLU input bounds from IBP) or "crown" (each ReLU's input bounded
    by its own backward pass, intersected with IBP's, before the next layer is propagated).
    """
    if intermediate not in ("ibp", "crown"):
        raise ValueError(f"intermediate bounds must be 'ibp' or 'crown', got {intermediate!r}")
    layers = check_supported(model, "crown" if intermediate == "crown" else "crown_ibp")
    box = input_box(x, eps, norm)
    centre, radius = box
    in_shapes = [x.shape[1:]]
    with torch.no_grad():
        probe = x[:1]
        for layer in layers:
            probe, _ = interval_step(layer, probe, torch.zeros_like(probe), bn_stats)
            in_shapes.append(probe.shape[1:])
    walk = Walk(layers, in_shapes, box, bn_stats, dense_convolutions(layers, in_shapes))
    # IBP is exact through per-channel affine maps around at most one mixing (Linear, Conv, pooling)
    # layer: only intervals after a ReLU or a second mixing layer are worth a CROWN pass.
    mixing_layers, interval_exact = 0, True
    for index, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.ReLU):
            lower, upper = centre - radius, centre + radius
            if intermediate == "crown" and not interval_exact:
                lower, upper = _refine(walk, index, lower, upper)
                centre, radius = (upper + lower) / 2, (upper - lower) / 2
            walk.relu_bounds[index] = (lower, upper)
            interval_exact = False
        elif isinstance(layer, (*LINEAR, *POOLING)):
            mixing_layers += 1
            interval_exact = interval_exact and mixing_layers == 1
        centre, radius = interval_step(layer, centre, radius, bn_stats)
    spec = margin_spec(y, layers[-1].out_features, layers[-1].weight.dtype)
    bounds = backward_lower_bound(walk, len(layers), spec)
    return bounds.scatter(1, y[:, None], 0.0)
