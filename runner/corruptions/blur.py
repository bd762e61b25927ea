"""Blur corruptions. Spatial: they run at the working resolution (see `runner.corruptions`), where
`scale` = working size / 32 converts CIFAR-10-C's pixel lengths.

Kernels are built on the 32-pixel grid the constants were chosen for. Below 32 pixels (scale < 1) their
taps are moved to offset·scale and spread bilinearly (`ops.splat`), so a kernel keeps its shape at
sub-pixel size and the severities stay ordered; above 32 pixels the lengths themselves are scaled.
"""

import math

import torch

from runner.corruptions import ops

DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, anti-alias sigma
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max shift, passes
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma
# Zoom factors 1.00, 1.01, ... : np.arange(1, 1 + m, 0.01) in the reference yields 7, 12, 16, 21 and 26
# factors for m = 0.06 ... 0.26 (floating-point rounding includes the end point of the first two).
ZOOM_BLUR = ((7,), (12,), (16,), (21,), (26,))


def defocus_kernel(radius: float, alias_sigma: float, scale: float) -> torch.Tensor:
    """Hendrycks' `disk`: an aliased disk (x² + y² <= r²) normalised, smoothed by a 3×3 Gaussian
    (5×5 above radius 8), then resampled to the working grid."""
    growth = max(scale, 1.0)
    radius, alias_sigma = radius * growth, alias_sigma * growth
    half = 8 if radius <= 8 else math.ceil(radius)
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    disk = (yy**2 + xx**2 <= radius**2).double()
    disk = disk / disk.sum()
    smoothing = ops.gaussian_kernel1d(alias_sigma, 1 if radius <= 8 else 2)
    disk = ops.correlate(ops.correlate(disk[None, None], smoothing[None, :], "reflect101"),
                         smoothing[:, None], "reflect101")[0, 0]
    taps = disk.nonzero()
    return ops.splat(disk[taps[:, 0], taps[:, 1]], taps - half, scale / growth)


def defocus_blur(x, level, rng, scale):
    radius, alias_sigma = level
    return ops.correlate(x, defocus_kernel(radius, alias_sigma, scale), "reflect101")


def glass_blur(x, level, rng, scale):
    """Gaussian blur, then make_cifar_c.py's pixel shuffle `passes` times, then blur again.

    The reference scans every interior pixel from the bottom-right corner (rows, then columns, both
    descending) and runs `x[h, w], x[h', w'] = x[h', w'], x[h, w]` with (h', w') shifted by
    [−shift, shift − 1] per axis (numpy randint excludes +shift). On an H×W×3 array both right-hand
    sides are views, so the line copies x[h', w'] into x[h, w] and leaves x[h', w'] as it was (numpy
    issue #14428): not a swap. CIFAR-10-C and ImageNet-C were generated that way; so is this.

    Copies in sequence: a pixel takes its neighbour's value at the moment of its own step, which is the
    neighbour's new value when the neighbour was scanned earlier in the same pass. Each scanned pixel
    therefore points either at an earlier-scanned pixel (take its result) or at a pixel not yet written
    (take its value from before the pass); the chains are resolved by pointer doubling, vectorised over
    the batch and the image, instead of a Python loop over pixels."""
    sigma, max_shift, passes = level
    sigma, max_shift = sigma * scale, max(1, round(max_shift * scale))
    x = ops.gaussian_blur(x, sigma, truncate=4.0, mode="edge")
    n, c, h, w = x.shape
    device = x.device
    rows = torch.arange(h - max_shift, max_shift, -1, device=device)
    cols = torch.arange(w - max_shift, max_shift, -1, device=device)
    positions = (rows[:, None] * w + cols[None, :]).flatten()  # flat pixel index, in scan order
    steps = len(positions)
    scan_step = torch.full((h * w,), steps, dtype=torch.int64, device=device)  # `steps`: never written
    scan_step[positions] = torch.arange(steps, device=device)
    own_step = torch.arange(steps, device=device).expand(n, steps)
    source = torch.arange(h * w, device=device).expand(n, h * w).clone()  # pixel i holds original source[i]
    doublings = max(steps - 1, 1).bit_length()  # a chain has at most steps - 1 links
    for pass_index in range(passes):
        # One 32-bit draw per position: its two 16-bit halves give the row and column shifts.
        bits = rng.bits(pass_index, (steps,)).to(device)
        shift_rows = (bits & 0xFFFF) % (2 * max_shift) - max_shift
        shift_cols = (bits >> 16) % (2 * max_shift) - max_shift
        partners = positions + shift_rows * w + shift_cols  # (n, steps)
        partner_step = scan_step[partners]
        # A partner scanned earlier in this pass was already overwritten: link to its step. Otherwise
        # (not scanned yet, never scanned, or the pixel itself) the chain ends at its pre-pass value.
        link = torch.where(partner_step < own_step, partner_step, own_step)
        value_at_end = source.gather(1, partners)
        for _ in range(doublings):
            link = link.gather(1, link)
        source.scatter_(1, positions.expand(n, steps), value_at_end.gather(1, link))
    index = source.view(n, 1, h * w).expand(n, c, h * w)
    x = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return ops.gaussian_blur(x, sigma, truncate=4.0, mode="edge")


def motion_taps(radius: float, sigma: float, scale: float):
    """ImageMagick's MotionBlurImage kernel: width 2·radius + 1 taps i = 0, 1, ... along the direction
    of motion, weights exp(-i² / 2σ²) normalised (a one-sided streak)."""
    growth = max(scale, 1.0)
    width = 2 * math.ceil(radius * growth) + 1
    steps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(steps**2) / (2 * (sigma * growth) ** 2))
    weights = weights / weights.sum()
    kept = weights > 1e-9  # taps far out in the tail change no pixel by more than ~1e-8: skip them
    return steps[kept], weights[kept], scale / growth


def streak(x: torch.Tensor, angle_degrees: torch.Tensor, radius: float, sigma: float, scale: float):
    """Motion blur with one angle per image: a weighted sum of edge-padded shifted copies, tap i
    read from ceil(i·(sin, cos)·angle − 0.5) pixels away (ImageMagick's rounding of the offsets)."""
    steps, weights, spacing = motion_taps(radius, sigma, scale)
    angle = torch.deg2rad(angle_degrees.double())[None, :]
    dy = torch.ceil(steps[:, None].to(angle) * torch.sin(angle) - 0.5) * spacing
    dx = torch.ceil(steps[:, None].to(angle) * torch.cos(angle) - 0.5) * spacing
    return ops.sum_of_shifts(x, dy, dx, weights)


def motion_blur(x, level, rng, scale):
    radius, sigma = level
    angle = -45 + 90 * rng.uniform(0)
    return streak(x, angle, radius, sigma, scale)


def zoom_blur(x, level, rng, scale):
    """Mean of the image and its centre zooms by 1.00, 1.01, ... (zoom is relative: no scaling)."""
    (count,) = level
    h, w = x.shape[-2:]
    total = x.clone()
    for step in range(count):
        factor = 1 + 0.01 * step
        total = total + ops.resample_separable(
            x, ops.linear_zoom_matrix(h, factor), ops.linear_zoom_matrix(w, factor)
        )
    return total / (count + 1)
