"""Fused CPU loops (numba) for interval bound propagation on float32 tensors: the interval ReLU
one loop each way, the gradient through |W| added in one pass, and the input box formed and normalised in
one pass.

The ATen formulation of the scaled interval ReLU (`ibp._relu_ends` and `ibp._IntervalReLU.backward`) makes
six passes over activation-sized memory forward and six backward; these loops make one each (read c and r,
write C', R' and one byte saying which ends are positive; read two gradients and that byte, write two
gradients). They are bitwise the ATen results: the same float32 additions in the same order, and the same
gradient masks.

Used when numba imports and the tensors are float32 on a CPU; everything else (CUDA, float64, bf16 under
autocast, no numba) takes the ATen path (see runner/compiled.py).
"""

import functools

import numpy as np
import torch

from runner import compiled


@functools.cache
def _kernels():
    """(forward, backward, accumulate_signed, normalised_box) compiled loops, or None without numba. numba
    is imported on first use only: a run that never bounds an interval does not pay for the import."""
    if compiled.numba_module() is None:  # numba is a dependency; a trimmed install still runs on ATen
        return None

    @compiled.jit
    def forward(c, r, centre, radius, active):
        zero = np.float32(0.0)
        for i in range(c.size):
            upper = c[i] + r[i]
            lower = c[i] - r[i]
            upper = upper if upper > zero else zero
            lower = lower if lower > zero else zero
            centre[i] = upper + lower
            radius[i] = upper - lower
            active[i] = (upper > zero) + 2 * (lower > zero)

    @compiled.jit
    def backward(grad_centre, grad_radius, active, grad_c, grad_r):
        # Both sums are formed before the masks select: branch-free, so the loop vectorises (~15% faster).
        zero = np.float32(0.0)
        for i in range(active.size):
            bits = active[i]
            grad_upper = grad_centre[i] + grad_radius[i]
            grad_lower = grad_centre[i] - grad_radius[i]
            grad_upper = grad_upper if bits & np.uint8(1) else zero
            grad_lower = grad_lower if bits & np.uint8(2) else zero
            grad_c[i] = grad_upper + grad_lower
            grad_r[i] = grad_upper - grad_lower

    @compiled.jit
    def accumulate_signed(total, update, weight):
        zero = np.float32(0.0)
        for i in range(total.size):
            if weight[i] > zero:
                total[i] += update[i]
            elif weight[i] < zero:
                total[i] -= update[i]

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

    return forward, backward, accumulate_signed, normalised_box


def available(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and _kernels() is not None


def accumulate_signed(total: torch.Tensor, update: torch.Tensor, weight: torch.Tensor) -> None:
    """total += sgn(weight) * update, in place (the gradient through |weight| added to total)."""
    if available(total) and total.is_contiguous():
        _kernels()[2](_flat(total), _flat(update.contiguous()), _flat(weight.contiguous()))
    else:
        total.addcmul_(weight.sign(), update)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


def relu_forward(c: torch.Tensor, r: torch.Tensor):
    """(relu(c + r) + relu(c - r), relu(c + r) - relu(c - r), activity), fused. activity is one byte per
    element: bit 0 the upper end is positive, bit 1 the lower end is (all the backward pass reads)."""
    c, r = c.contiguous(), r.contiguous()
    centre, radius = torch.empty_like(c), torch.empty_like(r)
    active = torch.empty(c.shape, dtype=torch.uint8)
    _kernels()[0](_flat(c), _flat(r), _flat(centre), _flat(radius), _flat(active))
    return centre, radius, active


def relu_backward(grad_centre: torch.Tensor, grad_radius: torch.Tensor, active: torch.Tensor):
    """Gradients w.r.t. (c, r) of `relu_forward`, fused."""
    grad_centre, grad_radius = grad_centre.contiguous(), grad_radius.contiguous()
    grad_c, grad_r = torch.empty_like(grad_centre), torch.empty_like(grad_radius)
    _kernels()[1](*(_flat(t) for t in (grad_centre, grad_radius, active, grad_c, grad_r)))
    return grad_c, grad_r


def normalised_box(x: torch.Tensor, eps: float, scale: torch.Tensor, doubled_shift: torch.Tensor):
    """The eps-box of x through a per-channel affine input layer (scale, shift), as the scaled interval
    ((upper + lower)·scale + 2·shift, (upper - lower)·|scale|): one pass where ATen takes seven. `scale` and
    `doubled_shift` are float32 per-channel vectors; x is [B, C, ...] float32 on a CPU."""
    x = x.contiguous()
    centre, radius = torch.empty_like(x), torch.empty_like(x)
    planes = [t.detach().reshape(x.shape[0], x.shape[1], -1).numpy() for t in (x, centre, radius)]
    _kernels()[3](planes[0], np.float32(eps), _flat(scale), _flat(doubled_shift), planes[1], planes[2])
    return centre, radius
