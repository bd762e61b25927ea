"""Interval bound propagation (Gowal et al. 2018) in centre/radius form.

An interval [c - r, c + r] goes through an affine map W as [Wc + b - |W|r, Wc + b + |W|r] (exact for one
layer), through ReLU end by end, and through reshapes and average pooling unchanged in form (pooling has
non-negative weights). With the margin specification folded into the last linear layer (elision) the
margins are bounded from the penultimate interval directly, which is never looser.

Inside a propagation the interval is carried scaled, as (C, R, k) = (k·c, k·r, k) with k a power of two:
the ReLU rule c' = (relu(c + r) + relu(c - r)) / 2 becomes C' = relu(C + R) + relu(C - R) with k' = 2k
(ReLU is positively homogeneous), and an affine layer scales only its bias by k. That saves two
divisions per activation and two more in the backward pass, and changes no number: a power-of-two
scale is exact in floating point, so C / k is bitwise the c of the unscaled recursion.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from runner.bounds import fused
from runner.bounds.graph import (
    CHANNEL_AFFINE,
    POOLING,
    UnsupportedModel,
    channel_affine,
    channel_view,
    check_supported,
    layer_problem,
    unwrap,
)
from runner.layers import Residual


def _scaled_box(x: torch.Tensor, eps: float, norm: str):
    """The eps-box as a scaled interval (upper + lower, upper - lower, 2), formed with two fresh tensors."""
    if norm != "linf":
        raise NotImplementedError(f"threat.norm={norm!r}: interval bounds and CROWN here certify linf balls only")
    if eps < 0:
        raise ValueError(f"threat.eps must be >= 0, got {eps}")
    lower, upper = torch.sub(x, eps).clamp_(0.0, 1.0), torch.add(x, eps).clamp_(0.0, 1.0)
    return upper + lower, upper.sub_(lower), 2.0


def _affine_in_place(layer: nn.Module, c: torch.Tensor, r: torch.Tensor, scale: float, bn_stats) -> bool:
    """Apply a constant channel affine map (Normalize; not a trained BatchNorm) to a scaled interval in
    place; False when `layer` is not one (the caller then propagates it the ordinary way)."""
    if not isinstance(layer, CHANNEL_AFFINE):
        return False
    weight, shift = channel_affine(layer, bn_stats)
    if weight.requires_grad or shift.requires_grad:
        return False
    weight, shift = channel_view(weight, c.dim()), channel_view(shift * scale, c.dim())
    c.mul_(weight).add_(shift)
    r.mul_(weight.abs())
    return True


def _input_interval(x: torch.Tensor, eps: float, norm: str, first: nn.Module | None, bn_stats):
    """The scaled eps-box, through `first` too when it is a constant channel affine map (the input
    normalisation): (C, R, scale, whether `first` was applied)."""
    # The loop writes NCHW-contiguous tensors: a channels-last batch keeps its format on the ATen path.
    one_pass = fused.available(x) and x.dim() > 1 and x.is_contiguous() and eps >= 0 and norm == "linf"
    if isinstance(first, CHANNEL_AFFINE) and one_pass:
        weight, shift = channel_affine(first, bn_stats)
        if not (weight.requires_grad or shift.requires_grad) and weight.numel() == x.shape[1]:
            return (*fused.normalised_box(x, eps, weight, shift * 2.0), 2.0, True)
    c, r, scale = _scaled_box(x, eps, norm)
    return c, r, scale, first is not None and _affine_in_place(first, c, r, scale, bn_stats)


def input_box(x: torch.Tensor, eps: float, norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """The L∞ box [max(x-eps, 0), min(x+eps, 1)] as (centre, radius)."""
    doubled_centre, doubled_radius, _ = _scaled_box(x, eps, norm)
    return doubled_centre.mul_(0.5), doubled_radius.mul_(0.5)


def interval_step(layer: nn.Module, c: torch.Tensor, r: torch.Tensor, bn_stats: dict | None):
    """One non-container layer applied to the interval (c, r)."""
    return _unscaled(*_scaled_step(layer, c, r, 1.0, bn_stats))


def _unscaled(c: torch.Tensor, r: torch.Tensor, scale: float):
    """The scaled interval (c, r, scale) as (centre, radius); dividing by a power of two is exact."""
    if scale == 1.0:
        return c, r
    return c * (1.0 / scale), r * (1.0 / scale)


def _relu_ends(c: torch.Tensor, r: torch.Tensor):
    """(relu(c + r) + relu(c - r), relu(c + r) - relu(c - r), relu(c - r)) in three fresh tensors. On a CPU
    a fresh activation-sized tensor costs more (page faults) than a pass over it, so the sums are
    formed in place: autograd's version of this allocates eight tensors forward and backward."""
    upper = torch.add(c, r).relu_()
    lower = torch.sub(c, r).relu_()
    radius = torch.sub(upper, lower)
    return upper.add_(lower), radius, lower


class _IntervalReLU(torch.autograd.Function):
    """ReLU on a scaled interval as one autograd node: (c, r) -> (relu(c + r) + relu(c - r),
    relu(c + r) - relu(c - r)). The upper end is active where the new centre is positive (the ends are
    non-negative), the lower end where relu(c - r) is. With `overwrite` the fused loop writes the results
    over c and r, which nothing else may hold; with `own_gradients` the backward loop writes over the
    gradients it is handed, which only the next layer's backward may have made (see `_propagate_layers`)."""

    @staticmethod
    def forward(ctx, c, r, overwrite=False, own_gradients=False):
        ctx.own_gradients = own_gradients
        if fused.available(c):
            centre, radius, active = fused.relu_forward(c, r, overwrite)
            if centre is c:
                ctx.mark_dirty(c, r)
            ctx.save_for_backward(active)
            return centre, radius
        centre, radius, lower = _relu_ends(c, r)
        ctx.save_for_backward(centre, lower)
        return centre, radius

    @staticmethod
    @once_differentiable  # no double backward through the bounds (nothing here needs one)
    def backward(ctx, grad_centre, grad_radius):
        if len(ctx.saved_tensors) == 1:  # the fused forward's activity bytes
            return *fused.relu_backward(grad_centre, grad_radius, ctx.saved_tensors[0], ctx.own_gradients), None, None
        centre, lower = ctx.saved_tensors
        threshold_backward_ = torch.ops.aten.threshold_backward.grad_input
        grad_upper = torch.add(grad_centre, grad_radius)
        grad_lower = torch.sub(grad_centre, grad_radius)
        threshold_backward_(grad_upper, centre, 0, grad_input=grad_upper)
        threshold_backward_(grad_lower, lower, 0, grad_input=grad_lower)
        return torch.add(grad_upper, grad_lower), grad_upper.sub_(grad_lower), None, None


class _IntervalLinear(torch.autograd.Function):
    """A Linear layer on an interval, (c, r) -> (W c + b, |W| r), as one autograd node. The weight's
    gradient sgn(W) * (gR^T r) + gC^T c takes one weight-sized pass (`fused.times_sign`) between two
    matrix products, the second accumulating into the first's result: autograd's |W| takes five more,
    and a wide first dense layer's weight is as large as the largest activation."""

    @staticmethod
    def forward(ctx, c, r, weight, bias):
        magnitude = weight.abs()
        ctx.save_for_backward(c, r, weight, magnitude)
        return F.linear(c, weight, bias), F.linear(r, magnitude)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_centre, grad_radius):
        c, r, weight, magnitude = ctx.saved_tensors
        need_c, need_r, need_weight, need_bias = ctx.needs_input_grad
        grad_centre = grad_centre.reshape(-1, grad_centre.shape[-1])
        grad_radius = grad_radius.reshape(-1, grad_radius.shape[-1])
        grad_c = (grad_centre @ weight).view(c.shape) if need_c else None
        grad_r = (grad_radius @ magnitude).view(r.shape) if need_r else None
        grad_weight = None
        if need_weight:
            grad_weight = grad_radius.t() @ r.reshape(-1, r.shape[-1])
            fused.times_sign(grad_weight, weight)
            grad_weight.addmm_(grad_centre.t(), c.reshape(-1, c.shape[-1]))
        grad_bias = grad_centre.sum(0) if need_bias else None
        return grad_c, grad_r, grad_weight, grad_bias


def _scaled_step(
    layer: nn.Module,
    c: torch.Tensor,
    r: torch.Tensor,
    scale: float,
    bn_stats: dict | None,
    overwrite: bool = False,
    own_gradients: bool = False,
):
    """One non-container layer applied to the scaled interval (c, r, scale): see the module docstring.
    `overwrite`: c and r are held by nothing else, and a ReLU may write its results over them;
    `own_gradients`: so are the gradients its backward will be handed."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        bias = layer.bias
        if bias is not None and scale != 1.0:
            bias = bias * scale
        if isinstance(layer, nn.Linear):
            # Under autocast the plain ops below pick their own dtypes, forward and backward.
            if torch.is_grad_enabled() and not torch.is_autocast_enabled(c.device.type):
                return (*_IntervalLinear.apply(c, r, layer.weight, bias), scale)
            return F.linear(c, layer.weight, bias), F.linear(r, layer.weight.abs()), scale
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return (
            F.conv2d(c, layer.weight, bias, **conv),
            F.conv2d(r, layer.weight.abs(), None, **conv),
            scale,
        )
    if isinstance(layer, nn.ReLU):
        if torch.is_grad_enabled() and (c.requires_grad or r.requires_grad):
            c, r = _IntervalReLU.apply(c, r, overwrite, own_gradients)
        elif fused.available(c):
            c, r, _ = fused.relu_forward(c, r, overwrite)
        else:
            c, r, _ = _relu_ends(c, r)
        return c, r, 2.0 * scale
    if isinstance(layer, CHANNEL_AFFINE):
        weight, shift = channel_affine(layer, bn_stats)
        if scale != 1.0:
            shift = shift * scale
        weight, shift = channel_view(weight, c.dim()), channel_view(shift, c.dim())
        return c * weight + shift, r * weight.abs(), scale
    if isinstance(layer, (nn.Flatten, *POOLING)):
        return layer(c), layer(r), scale
    if isinstance(layer, nn.Identity):
        return c, r, scale
    raise TypeError(f"no interval rule for {type(layer).__name__}")


def _propagate_layers(layers, c, r, scale: float, bn_stats, relu_inputs: list | None):
    """The scaled interval through `layers` in turn. A Linear or Conv2d returns fresh tensors that only
    this loop holds, so a ReLU right after one may overwrite them; not when its input is also kept for
    the regulariser, nor a tensor passed in (a residual block's input feeds both branches). Likewise the
    backward of a Linear or Conv2d hands fresh gradients to the ReLU that feeds it (through a Flatten at
    most), whose backward may overwrite them."""
    layers, fresh = list(layers), False
    for index, layer in enumerate(layers):
        overwrite = fresh and relu_inputs is None
        own_gradients = _feeds_affine(layers[index + 1 : index + 3])
        c, r, scale = _propagate_scaled(layer, c, r, scale, bn_stats, relu_inputs, overwrite, own_gradients)
        fresh = isinstance(layer, (nn.Linear, nn.Conv2d))
    return c, r, scale


def _feeds_affine(following: list) -> bool:
    if following and isinstance(following[0], nn.Flatten):
        following = following[1:]
    return bool(following) and isinstance(following[0], (nn.Linear, nn.Conv2d))


def _propagate_scaled(
    module: nn.Module, c, r, scale: float, bn_stats, relu_inputs: list | None, overwrite=False, own_gradients=False
):
    if isinstance(module, nn.Sequential):
        return _propagate_layers(module, c, r, scale, bn_stats, relu_inputs)
    if isinstance(module, Residual):
        c_main, r_main, s_main = _propagate_scaled(module.main, c, r, scale, bn_stats, relu_inputs)
        c_short, r_short, s_short = _propagate_scaled(module.shortcut, c, r, scale, bn_stats, relu_inputs)
        if s_main > s_short:  # bring the branches to one scale (a power of two: exact)
            c_short, r_short = c_short * (s_main / s_short), r_short * (s_main / s_short)
        elif s_short > s_main:
            c_main, r_main = c_main * (s_short / s_main), r_main * (s_short / s_main)
        return c_main + c_short, r_main + r_short, max(s_main, s_short)
    if isinstance(module, nn.ReLU) and relu_inputs is not None:
        relu_inputs.append(_unscaled(c, r, scale))
    return _scaled_step(module, c, r, scale, bn_stats, overwrite, own_gradients)


def propagate(module: nn.Module, c, r, bn_stats=None, relu_inputs: list | None = None):
    """The interval (c, r) through `module` (containers included). Each ReLU's input interval is
    appended to `relu_inputs` as (centre, radius) when a list is given (Shi et al.'s regulariser)."""
    return _unscaled(*_propagate_scaled(unwrap(module), c, r, 1.0, bn_stats, relu_inputs))


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
    body = layers if not elide else layers[:-1]
    c, r, scale, normalised = _input_interval(x, eps, norm, body[0] if body else None, bn_stats)
    if normalised:
        body = body[1:]
    c, r, scale = _propagate_layers(body, c, r, scale, bn_stats, relu_inputs)
    if not elide:
        c, r = _unscaled(c, r, scale)
        lower, upper = c - r, c + r
        return (lower.gather(1, y[:, None]) - upper).scatter(1, y[:, None], 0.0)
    return elided_margin_bounds(layers[-1], c, r, 1.0 / scale, y)


def elided_margin_bounds(last: nn.Linear, c: torch.Tensor, r: torch.Tensor, unscale: float, y: torch.Tensor):
    """Lower bounds of z_y - z_j from the last layer's input interval (c, r) carried at scale 1 / unscale,
    with the specification e_y - e_j folded into the last layer: centre (W_y - W_j) c + b_y - b_j, radius
    |W_y - W_j| r. Column y is exactly 0 (both terms vanish)."""
    logits = F.linear(c, last.weight) * unscale
    if last.bias is not None:
        logits = logits + last.bias
    centre = logits.gather(1, y[:, None]) - logits
    if fused.available(r) and last.weight.dtype == r.dtype and r.dim() == 2:
        return centre - _ElidedRadius.apply(r, last.weight, y, unscale)
    # A gather and one broadcast product, not a batch of tiny matrix products: ~3x faster on a CPU.
    folded = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # [B, K, hidden]
    radius = (folded.abs() * r.unsqueeze(1)).sum(-1) * unscale
    return centre - radius


class _ElidedRadius(torch.autograd.Function):
    """(r, W) -> |W_y - W_j| r * unscale as one node, each way one fused loop (float32 on a CPU)."""

    @staticmethod
    def forward(ctx, r, weight, y, unscale):
        ctx.save_for_backward(r, weight, y)
        ctx.unscale = unscale
        return fused.elided_radius(r, weight, y, unscale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        r, weight, y = ctx.saved_tensors
        return *fused.elided_radius_backward(grad, r, weight, y, ctx.unscale), None, None


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "linf", bn_stats=None):
    """(lower, upper) of the model's outputs over the eps-box (no specification)."""
    problem = layer_problem(model, "ibp")
    if problem:
        raise UnsupportedModel(problem)
    c, r = propagate(model, *input_box(x, eps, norm), bn_stats)
    return c - r, c + r
