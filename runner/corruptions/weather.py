"""Weather corruptions (snow, frost, fog). Spatial: they run at the working resolution.

Frost: CIFAR-10-C blends crops of six photographs of frost; no image files ship with this project, so
a frost texture is synthesised procedurally (haze from a plasma fractal plus thin bright ice needles
with 60° side branches, bluish white), deterministically: five fixed textures per working size that do
not depend on the seed, from which each image takes a seeded random texture and crop, as the reference
picks a random file and crop. Its statistics are an approximation of the photographs, not a copy.
"""

import functools
import math

import torch

from runner.corruptions import ops
from runner.corruptions.blur import streak
from runner.corruptions.rng import ImageStreams, derive_key

# loc, scale of the snow field; zoom; threshold; motion-blur radius, sigma; blend of the image
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # weight of the image, of the frost
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # fog strength, fractal decay per octave

FROST_VARIANTS = 5  # the reference draws from its first five photographs
FROST_TEXTURE_KEY = derive_key(0x46524F53)  # fixed: the textures play the role of files on disk
FROST_TINT = (0.86, 0.93, 1.0)  # RGB: ice is bluish white


def plasma_fractal(rng: ImageStreams, draw: int, size: int, decay: float) -> torch.Tensor:
    """Hendrycks' diamond-square height map per image, (n, size, size) in [0, 1]; size a power of two.

    The map is periodic (neighbours wrap around). Each level adds mean-of-neighbours plus
    wibble·U(−wibble, wibble) with wibble = 100 / decay^level, as in the reference.
    """
    heights = torch.zeros(rng.n, size, size, dtype=torch.float64, device=rng.device)
    step, wibble, level = size, 100.0, 0

    def noisy_mean(total: torch.Tensor, part: int) -> torch.Tensor:
        u = rng.uniform(draw + 3 * level + part, tuple(total.shape[1:]))
        return total / 4 + wibble * wibble * (2 * u - 1)

    while step >= 2:
        half = step // 2
        corners = heights[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        heights[:, half::step, half::step] = noisy_mean(square, 0)
        centres, corners = heights[:, half::step, half::step], heights[:, 0::step, 0::step]
        heights[:, 0::step, half::step] = noisy_mean(
            centres + centres.roll(1, 1) + corners + corners.roll(-1, 2), 1
        )
        heights[:, half::step, 0::step] = noisy_mean(
            centres + centres.roll(1, 2) + corners + corners.roll(-1, 1), 2
        )
        step, wibble, level = half, wibble / decay, level + 1
    flat = heights.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    return ((heights - low.view(-1, 1, 1)) / (high - low).clamp_min(1e-12).view(-1, 1, 1))


def fog(x, level, rng, scale):
    strength, decay = level
    n, _, h, w = x.shape
    size = 2 ** math.ceil(math.log2(max(h, w)))
    haze = plasma_fractal(rng, 0, size, decay)[:, :h, :w].to(x).unsqueeze(1)
    peak = x.flatten(1).amax(1).view(n, 1, 1, 1)
    return (x + strength * haze) * peak / (peak + strength)


def _render_lines(starts, ends, brightness, side: int, width: float) -> torch.Tensor:
    """Lines with a Gaussian cross-section (peak = brightness, std = width) on a side×side canvas:
    points every quarter pixel or closer along each segment are spread bilinearly, then blurred."""
    lengths = (ends - starts).norm(dim=1)
    steps = int(lengths.max().item() / 0.25) + 2
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    points = starts[:, None] + t[None, :, None] * (ends - starts)[:, None]  # (segments, steps, 2)
    # Mass brightness per unit length; a 2-D Gaussian blur then peaks at mass / (sqrt(2π)·width).
    mass = (brightness * lengths / (steps - 1) * math.sqrt(2 * math.pi) * width)[:, None].expand(-1, steps)
    canvas = ops.splat_points(side, points.reshape(-1, 2), mass.reshape(-1))
    return ops.gaussian_blur(canvas[None, None], width, truncate=4.0, mode="symmetric")[0, 0]


@functools.lru_cache(maxsize=8)
def frost_textures(size: int) -> torch.Tensor:
    """(FROST_VARIANTS, 3, 4·size, 4·size) RGB textures in [0, 1] for crops of size×size."""
    side = 4 * size
    rng = ImageStreams(FROST_TEXTURE_KEY, size, FROST_VARIANTS, "cpu")
    haze = plasma_fractal(rng, 0, 2 ** math.ceil(math.log2(side)), 1.6)[:, :side, :side]
    needles = 12 * 16  # about a dozen per crop-sized tile
    centre = rng.uniform(100, (needles, 2)) * side
    angle = rng.uniform(101, (needles,)) * math.pi
    length = (0.08 + 0.3 * rng.uniform(102, (needles,))) * size
    direction = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)
    starts = [centre - direction * length[..., None] / 2]
    ends = [centre + direction * length[..., None] / 2]
    for draw, turn in ((103, math.pi / 3), (104, -math.pi / 3)):  # side branches at 60°, like ice
        root = starts[0] + (ends[0] - starts[0]) * rng.uniform(draw, (needles,))[..., None]
        branch = torch.stack([torch.sin(angle + turn), torch.cos(angle + turn)], dim=-1)
        starts.append(root)
        ends.append(root + branch * (0.4 * length)[..., None])
    starts, ends = torch.cat(starts, 1), torch.cat(ends, 1)
    brightness = 0.5 + 0.5 * rng.uniform(105, (starts.shape[1],))
    width = 0.35 * size / 32 + 0.25  # needles about a pixel wide on a 32-pixel image
    ice = torch.stack([
        _render_lines(starts[v], ends[v], brightness[v], side, width) for v in range(FROST_VARIANTS)
    ])
    intensity = (0.25 + 0.45 * haze + 0.75 * ice).clamp(0, 1)
    return intensity[:, None] * torch.tensor(FROST_TINT, dtype=torch.float64).view(1, 3, 1, 1)


def frost(x, level, rng, scale):
    image_weight, frost_weight = level
    n, c, h, w = x.shape
    size = max(h, w)
    textures = frost_textures(size)
    textures = (ops.to_gray(textures) if c == 1 else textures).to(x)
    side = textures.shape[-1]
    variant = rng.integers(0, 0, FROST_VARIANTS)
    top = rng.integers(1, 0, side - h + 1)
    left = rng.integers(2, 0, side - w + 1)
    rows = (top[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    channels = torch.arange(c, device=x.device).view(1, c, 1, 1)
    crop = textures[variant.view(n, 1, 1, 1), channels, rows, cols]
    return image_weight * x + frost_weight * crop


def snow(x, level, rng, scale):
    """Flakes: a thresholded, zoomed Gaussian field, motion-blurred at an angle in (−135°, −45°) and
    added twice (also rotated by 180°) to an image brightened towards 1.5·grey + 0.5."""
    loc, std, zoom, threshold, blur_radius, blur_sigma, blend = level
    h, w = x.shape[-2:]
    flakes = loc + std * rng.normal(0, (1, h, w)).to(x)
    flakes = ops.resample_separable(flakes, ops.linear_zoom_matrix(h, zoom), ops.linear_zoom_matrix(w, zoom))
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    angle = -135 + 90 * rng.uniform(1)
    flakes = streak(flakes, angle, blur_radius, blur_sigma, scale)
    brightened = torch.maximum(x, ops.to_gray(x) * 1.5 + 0.5)
    x = blend * x + (1 - blend) * brightened
    return x + flakes + flakes.flip(-1, -2)
