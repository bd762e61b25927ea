"""Digital corruptions. Brightness, contrast, JPEG (per 8×8 block of the stored image) and pixelate (a
ratio of the side) run at the image's own resolution; elastic is spatial and runs at the working one.
"""

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from runner.corruptions import ops

BRIGHTNESS = ((0.05,), (0.1,), (0.15,), (0.2,), (0.3,))  # added to the HSV value
CONTRAST = ((0.75,), (0.5,), (0.4,), (0.3,), (0.15,))  # factor on the deviation from the channel mean
# Fractions of the image size: displacement amplitude, its smoothing sigma, affine jitter of 3 points.
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
PIXELATE = ((0.95,), (0.9,), (0.85,), (0.75,), (0.65,))  # side of the reduced image / side
JPEG_COMPRESSION = ((80,), (65,), (58,), (50,), (40,))  # libjpeg quality


def brightness(x, level, rng, scale):
    """HSV value + c (clipped at 1) with hue and saturation kept: every channel scales by v'/v, and a
    black pixel (v = 0, saturation 0) becomes grey v'. Exact, without converting to HSV."""
    (shift,) = level
    value = x.amax(1, keepdim=True)
    new_value = (value + shift).clamp(max=1.0)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value.expand_as(x))


def contrast(x, level, rng, scale):
    (factor,) = level
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * factor + means


def elastic_transform(x, level, rng, scale):
    """Random affine (the three points centre ± size//3 each moved by U(−a, a)) composed with a smooth
    random displacement (uniform noise, Gaussian-smoothed with scipy's 'reflect' border, times the
    amplitude), read bilinearly in one pass with mirrored borders. The reference resamples twice
    (cv2.warpAffine, then map_coordinates); one pass avoids blurring twice, the geometry is the same."""
    amplitude, smoothing, jitter = level
    n, _, h, w = x.shape
    size = min(h, w)  # the reference's IMSIZE: the constants are fractions of the image side
    amplitude, smoothing, jitter = amplitude * size, smoothing * size, jitter * size
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float64, device=x.device)
    arm = size // 3
    corners = torch.stack([centre + arm, torch.stack([centre[0] + arm, centre[1] - arm]), centre - arm])
    moved = corners + (2 * rng.uniform(0, (3, 2)) - 1) * jitter  # (n, 3, 2), points as (x, y)
    ones = torch.ones(3, 1, dtype=torch.float64, device=x.device)
    source = torch.cat([corners, ones], 1)  # forward map M with M·(p, 1) = moved point
    forward = torch.linalg.solve(source, moved).transpose(1, 2)  # (n, 2, 3)
    linear, offset = forward[:, :, :2], forward[:, :, 2]
    noise = 2 * rng.uniform(1, (2, h, w)) - 1
    displacement = ops.gaussian_blur(noise, smoothing, truncate=3.0, mode="symmetric") * amplitude
    cols = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w) + displacement[:, 0]
    rows = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1) + displacement[:, 1]
    # warpAffine reads the source at M⁻¹(p); p is the displaced position (x, y).
    target = torch.stack([cols, rows], -1) - offset.view(n, 1, 1, 2)
    source_points = torch.einsum("nij,nhwj->nhwi", torch.linalg.inv(linear), target)
    return ops.sample(x, source_points[..., 1], source_points[..., 0], "reflection")


def pixelate(x, level, rng, scale):
    """PIL BOX resize to int(side·c) and back. The ratio is relative, so it runs at the image's own
    resolution: at the working one, a pixel-replicated 8×8 image survives some ratios (32 → 24 → 32)
    untouched, and the severities would come out of order."""
    (factor,) = level
    h, w = x.shape[-2:]
    rows = ops.box_resize_matrix(int(h * factor), h) @ ops.box_resize_matrix(h, int(h * factor))
    cols = ops.box_resize_matrix(int(w * factor), w) @ ops.box_resize_matrix(w, int(w * factor))
    return ops.resample_separable(x, rows, cols)


def jpeg_compression(x, level, rng, scale):
    """libjpeg at the given quality through torchvision (batched in C++; 4:2:0 chroma for colour, as
    PIL's default in the reference). The codec needs 8-bit pixels, so the output is on the 1/255 grid."""
    (quality,) = level
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    decoded = decode_jpeg(encode_jpeg(list(pixels), quality=quality))
    return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255
