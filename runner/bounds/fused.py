"""Fused CPU loops (numba) for interval bound propagation on float32 tensors: the interval ReLU
one loop each way, the gradient through |W| signed in one pass, the input box formed and normalised in
one pass, and the radius of the elided last layer one loop each way.

The ATen formulation of the scaled interval ReLU (`ibp._relu_ends` and `ibp._IntervalReLU.backward`) makes
six passes over activation-sized memory forward and six backward; these loops make one each (read c and r,
write C', R' and one byte saying which ends are positive; read two gradients and that byte, write two
gradients). They are bitwise the ATen results: the same float32 additions in the same order, and the same
gradient masks. The forward may write its results over its inputs (`overwrite`): a convolution's fresh
output is then read and written while it is still in the cache, where fresh tensors would have to be
fetched first; so may the backward, over the fresh gradients the next layer hands it (measured on a
CIFAR-shaped IBP step on a 2-core CPU: ~1% and 1-2% of the step).

The elided head's radius |W_y - W_j| r (`ibp.elided_margin_bounds`) is ten small ATen ops forward and ten
backward on [batch, classes, hidden] temporaries; its loops make none (~2% of the same step). They sum
over the hidden units in order, where ATen's reduction sums in vector lanes: the radius differs from the
ATen path's in the last bits, as any two float32 summation orders do.

Used when numba imports and the tensors are float32 on a CPU; everything else (CUDA, float64, bf16 under
autocast, no numba) takes the ATen path (see runner/compiled.py).
"""

import functools
import types

import numpy as np
import torch

from runner import compiled
from runner.compiled import flat


@functools.cache
def _kernels():
    """The compiled loops by name, or None without numba. numba
    is imported on first use only: a run that never bounds an interval does not pay for the import."""
    if compiled.numba_module() is None:  # numba is a dependency; a trimmed install still runs on ATen
        return None

    @compiled.jit
    def relu_ends(c, r):
        # (upper + lower, upper - lower, which ends are positive) of the scaled interval (c, r)
        zero = np.float32(0.0)
        upper = c + r
        lower = c - r
        upper = upper if upper > zero else zero
        lower = lower if lower > zero else zero
        return upper + lower, upper - lower, (upper > zero) + 2 * (lower > zero)

    @compiled.jit
    def forward(c, r, centre, radius, active):
        for i in range(c.size):
            centre[i], radius[i], active[i] = relu_ends(c[i], r[i])

    @compiled.jit
    def forward_in_place(c, r, active):
        # Its own loop: passed as both input and output, the arrays would fail the vectoriser's runtime
        # overlap check and run element by element.
        for i in range(c.size):
            c[i], r[i], active[i] = relu_ends(c[i], r[i])

    @compiled.jit
    def gradient_ends(grad_centre, grad_radius, bits):
        # Both sums are formed before the masks select: branch-free, so the loops vectorise (~15% faster).
        zero = np.float32(0.0)
        grad_upper = grad_centre + grad_radius
        grad_lower = grad_centre - grad_radius
        grad_upper = grad_upper if bits & np.uint8(1) else zero
        grad_lower = grad_lower if bits & np.uint8(2) else zero
        return grad_upper + grad_lower, grad_upper - grad_lower

    @compiled.jit
    def backward(grad_centre, grad_radius, active, grad_c, grad_r):
        for i in range(active.size):
            grad_c[i], grad_r[i] = gradient_ends(grad_centre[i], grad_radius[i], active[i])

    @compiled.jit
    def backward_in_place(grad_centre, grad_radius, active):
        for i in range(active.size):
            grad_centre[i], grad_radius[i] = gradient_ends(grad_centre[i], grad_radius[i], active[i])

    @compiled.jit
    def times_sign(total, weight):
        zero = np.float32(0.0)
        for i in range(total.size):
            total[i] *= np.float32(weight[i] > zero) - np.float32(weight[i] < zero)

    @compiled.jit
    def normalised_box(x, eps, scale, doubled_shift, centre, radius):
        # x, centre, radius: [batch, channels, plane]. The eps-box [clamp(x - eps), clamp(x + eps)] as
        # (upper + lower, upper - lower) through the input normalisation, in the float32 operations and
        # order of ibp._scaled_box and ibp._affine_in_place (clamps pass NaN through, as torch's do).
        zero, one = np.float32(0.0), np.float32(1.0)
        for b in range(x.shape[0]):
            for channel in range(x.shape[1]):
                weight, shift, magnitude = scale[channel], doubled_shift[channel], abs(scale[channel])
                pixels, centres, radii = x[b, channel], centre[b, channel], radius[b, channel]
                for i in range(pixels.shape[0]):
                    lower = pixels[i] - eps
                    upper = pixels[i] + eps
                    lower = zero if lower < zero else lower
                    lower = one if lower > one else lower
                    upper = zero if upper < zero else upper
                    upper = one if upper > one else upper
                    centres[i] = (upper + lower) * weight + shift
                    radii[i] = (upper - lower) * magnitude

    @compiled.jit
    def elided_radius(r, weight, y, unscale, radius):
        # radius[b, j] = sum_h |weight[y_b, h] - weight[j, h]| r[b, h], times unscale (ibp's scaled interval)
        for b in range(r.shape[0]):
            true_row = weight[y[b]]
            for j in range(weight.shape[0]):
                row, total = weight[j], np.float32(0.0)
                for h in range(r.shape[1]):
                    total += abs(true_row[h] - row[h]) * r[b, h]
                radius[b, j] = total * unscale

    @compiled.jit
    def elided_radius_backward(grad, r, weight, y, unscale, grad_r, grad_weight, minus, row_sum):
        # grad_r, grad_weight and minus start at zero. Column y_b has |W_y - W_y| = 0: no gradient, skipped.
        # Row y_b gains and row j loses sgn(W_y - W_j) r; the gains are summed per sample (row_sum) and the
        # losses in their own array, so that no two rows written in the inner loop are views of one array
        # (the vectoriser's overlap check would fail on them and run the loop element by element).
        zero = np.float32(0.0)
        for b in range(r.shape[0]):
            label, inputs, grad_inputs = y[b], r[b], grad_r[b]
            true_row = weight[label]
            row_sum[:] = zero
            for j in range(weight.shape[0]):
                if j == label:
                    continue
                row, minus_row, scaled = weight[j], minus[j], grad[b, j] * unscale
                for h in range(inputs.shape[0]):
                    difference = true_row[h] - row[h]
                    grad_inputs[h] += scaled * abs(difference)
                    through = scaled * inputs[h] * (np.float32(difference > zero) - np.float32(difference < zero))
                    row_sum[h] += through
                    minus_row[h] += through
            grad_weight[label] += row_sum
        grad_weight -= minus

    return types.SimpleNamespace(
        forward=forward,
        forward_in_place=forward_in_place,
        backward=backward,
        backward_in_place=backward_in_place,
        times_sign=times_sign,
        normalised_box=normalised_box,
        elided_radius=elided_radius,
        elided_radius_backward=elided_radius_backward,
    )


def available(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and _kernels() is not None


def times_sign(total: torch.Tensor, weight: torch.Tensor) -> None:
    """total *= sgn(weight), in place (a gradient w.r.t. |weight| made one w.r.t. weight)."""
    if available(total) and total.is_contiguous():
        _kernels().times_sign(flat(total), flat(weight.contiguous()))
    else:
        total.mul_(weight.sign())


def relu_forward(c: torch.Tensor, r: torch.Tensor, overwrite: bool = False):
    """(relu(c + r) + relu(c - r), relu(c + r) - relu(c - r), activity), fused. activity is one byte per
    element: bit 0 the upper end is positive, bit 1 the lower end is (all the backward pass reads). With
    `overwrite` and contiguous inputs, the results are written over c and r (which are returned)."""
    active = torch.empty(c.shape, dtype=torch.uint8)
    if overwrite and c.is_contiguous() and r.is_contiguous():
        _kernels().forward_in_place(flat(c), flat(r), flat(active))
        return c, r, active
    c, r = c.contiguous(), r.contiguous()
    centre, radius = torch.empty_like(c), torch.empty_like(r)
    _kernels().forward(flat(c), flat(r), flat(centre), flat(radius), flat(active))
    return centre, radius, active


def relu_backward(grad_centre: torch.Tensor, grad_radius: torch.Tensor, active: torch.Tensor, overwrite=False):
    """Gradients w.r.t. (c, r) of `relu_forward`, fused. With `overwrite` (the caller owns both gradients)
    and two distinct contiguous gradients, the results are written over them (and returned)."""
    distinct = grad_centre.data_ptr() != grad_radius.data_ptr()
    if overwrite and distinct and grad_centre.is_contiguous() and grad_radius.is_contiguous():
        _kernels().backward_in_place(flat(grad_centre), flat(grad_radius), flat(active))
        return grad_centre, grad_radius
    grad_centre, grad_radius = grad_centre.contiguous(), grad_radius.contiguous()
    grad_c, grad_r = torch.empty_like(grad_centre), torch.empty_like(grad_radius)
    _kernels().backward(*(flat(t) for t in (grad_centre, grad_radius, active, grad_c, grad_r)))
    return grad_c, grad_r


def normalised_box(x: torch.Tensor, eps: float, scale: torch.Tensor, doubled_shift: torch.Tensor):
    """The eps-box of x through a per-channel affine input layer (scale, shift), as the scaled interval
    ((upper + lower)·scale + 2·shift, (upper - lower)·|scale|): one pass where ATen takes seven. `scale` and
    `doubled_shift` are float32 per-channel vectors; x is [B, C, ...] float32 on a CPU."""
    x = x.contiguous()
    centre, radius = torch.empty_like(x), torch.empty_like(x)
    planes = [t.detach().reshape(x.shape[0], x.shape[1], -1).numpy() for t in (x, centre, radius)]
    _kernels().normalised_box(planes[0], np.float32(eps), flat(scale), flat(doubled_shift), planes[1], planes[2])
    return centre, radius


def elided_radius(r: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, unscale: float) -> torch.Tensor:
    """[B, K]: sum_h |weight[y_b, h] - weight[j, h]| r[b, h] * unscale, one loop (float32 on a CPU)."""
    r, weight = r.detach().contiguous(), weight.detach().contiguous()
    radius = r.new_empty(r.shape[0], weight.shape[0])
    labels = y.contiguous().numpy()
    _kernels().elided_radius(r.numpy(), weight.numpy(), labels, np.float32(unscale), radius.numpy())
    return radius


def elided_radius_backward(grad, r, weight, y, unscale: float):
    """Gradients w.r.t. (r, weight) of `elided_radius`, one loop."""
    r, weight = r.detach().contiguous(), weight.detach().contiguous()
    grad_r, grad_weight, minus = torch.zeros_like(r), torch.zeros_like(weight), torch.zeros_like(weight)
    inputs = (t.detach().contiguous().numpy() for t in (grad, r, weight, y))
    outputs = (t.numpy() for t in (grad_r, grad_weight, minus))
    scratch = np.empty(r.shape[1], dtype=np.float32)
    _kernels().elided_radius_backward(*inputs, np.float32(unscale), *outputs, scratch)
    return grad_r, grad_weight
