"""The 15 common corruptions of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019), regenerated.

`corrupt(x, name, severity, seed)` corrupts a batch N×C×H×W in [0, 1] (C = 1 or 3) with the constants
of CIFAR-10-C (`make_cifar_c.py`), in vectorised torch. Results are "regenerated" -C sets: the same
corruptions and constants, new random draws, not the published files.

Determinism: every random draw is a hash of (seed, corruption, image index, draw), see `rng.py`. The
same seed gives bit-identical output, and image i is corrupted the same way whatever batch it is in,
given `first_index`, its index in the data set: corrupting x[a:b] with first_index=a reproduces rows
a..b of corrupting x. Severities share their draws (common random numbers): a severity changes only
the constants, so severity curves are not confounded by fresh noise.

Image size: CIFAR-10-C's constants are for 32×32 images. Per-pixel corruptions (noises, brightness,
contrast), JPEG (8×8 blocks of the stored image) and pixelate (a ratio of the side) run at the image's
own resolution with the constants unchanged. Spatial corruptions (blurs, weather, elastic) run at a
working resolution: the image is enlarged by an integer factor k = round(32 / side) by pixel
replication, corrupted, and reduced by k×k averaging; replication followed by averaging is the
identity. For 8×8 digits (which scikit-learn made by counting pixels in 4×4 blocks of 32×32 bitmaps)
that is corrupting a 32×32 image with the exact CIFAR constants and reducing it the way the data set
was made. When the working side is not 32 (28×28 MNIST: k = 1) lengths in pixels are scaled by
side / 32; below 32, kernels keep their shape at sub-pixel size (`blur.py`) so severities stay
ordered. Relative constants (zoom factors, elastic fractions of the side, fractal size = image size)
need no scaling.

Departures from the reference, each documented where it happens: outputs stay float (no uint8 round
trips except inside JPEG), frost textures are synthesised (no photographs here), elastic resamples
once, motion-blur taps of weight < 1e-9 are skipped, the snow layer is not quantised.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runner.corruptions import blur, digital, noise, ops, weather
from runner.corruptions.rng import ImageStreams, derive_key

REFERENCE_SIZE = 32  # the image side CIFAR-10-C's constants were chosen for
SEVERITIES = (1, 2, 3, 4, 5)
# Below this many values at the working resolution a call runs on one intra-op thread: the many small
# ops of a corruption cost more in thread hand-offs than they gain (4× slower with 2 threads on a
# loaded 2-core machine, digits at 32×32). Larger batches keep torch's thread count.
SINGLE_THREAD_BELOW = 2**21


@dataclass(frozen=True)
class Corruption:
    apply: Callable  # (x, level, rng: ImageStreams, scale: float) -> x, unclipped
    levels: tuple  # constants for severities 1..5
    spatial: bool  # runs at the working resolution


_TABLE = {
    "gaussian_noise": Corruption(noise.gaussian_noise, noise.GAUSSIAN_NOISE, False),
    "shot_noise": Corruption(noise.shot_noise, noise.SHOT_NOISE, False),
    "impulse_noise": Corruption(noise.impulse_noise, noise.IMPULSE_NOISE, False),
    "defocus_blur": Corruption(blur.defocus_blur, blur.DEFOCUS_BLUR, True),
    "glass_blur": Corruption(blur.glass_blur, blur.GLASS_BLUR, True),
    "motion_blur": Corruption(blur.motion_blur, blur.MOTION_BLUR, True),
    "zoom_blur": Corruption(blur.zoom_blur, blur.ZOOM_BLUR, True),
    "snow": Corruption(weather.snow, weather.SNOW, True),
    "frost": Corruption(weather.frost, weather.FROST, True),
    "fog": Corruption(weather.fog, weather.FOG, True),
    "brightness": Corruption(digital.brightness, digital.BRIGHTNESS, False),
    "contrast": Corruption(digital.contrast, digital.CONTRAST, False),
    "elastic_transform": Corruption(digital.elastic_transform, digital.ELASTIC, True),
    "pixelate": Corruption(digital.pixelate, digital.PIXELATE, False),
    "jpeg_compression": Corruption(digital.jpeg_compression, digital.JPEG_COMPRESSION, False),
}
CORRUPTIONS = tuple(_TABLE)  # Hendrycks' order: noise, blur, weather, digital


def working_factor(height: int, width: int) -> int:
    """Integer enlargement that brings the image side closest to 32 pixels (1 for 28 or 32 and up)."""
    return max(1, round(REFERENCE_SIZE / min(height, width)))


def check_images(x: torch.Tensor, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor N×C×H×W, got {getattr(x, 'shape', type(x))}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"{name}: corruptions need 1 (greyscale) or 3 (RGB) channels, got {c}")
    if h < 4 or w < 4:
        raise ValueError(f"{name}: images must be at least 4×4, got {h}×{w}")
    if n and (x.min() < 0 or x.max() > 1):
        low, high = x.min().item(), x.max().item()
        raise ValueError(f"{name}: pixel values must lie in [0, 1], got [{low:g}, {high:g}]")


def stream_key(seed: int, name: str) -> int:
    """Severities share their draws (common random numbers): severity changes only the constants, so
    a severity curve is not confounded by fresh noise, and stronger noise is the same noise scaled."""
    return derive_key(seed % 2**64, CORRUPTIONS.index(name))


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, *, first_index: int = 0):
    """x N×C×H×W in [0, 1] -> corrupted copy, same shape, dtype and device, in [0, 1].

    first_index: the data-set index of x[0], so that a chunk is corrupted as it would be in the full set.
    """
    spec = _lookup(name)
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return apply_level(x, name, spec.levels[severity - 1], seed, first_index=first_index)


def apply_level(x: torch.Tensor, name: str, level: tuple, seed: int = 0, *, first_index: int = 0):
    """`corrupt` with explicit constants instead of a severity (same pipeline, same random draws)."""
    spec = _lookup(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    check_images(x)
    if len(x) == 0:
        return x.clone()
    factor = working_factor(*x.shape[-2:]) if spec.spatial else 1
    with single_thread_if_small(x.numel() * factor**2, x.device):
        rng = ImageStreams(stream_key(seed, name), first_index, len(x), x.device)
        work = ops.nearest_upsample(x.float(), factor)
        scale = min(work.shape[-2:]) / REFERENCE_SIZE
        out = spec.apply(work, tuple(level), rng, scale).clamp(0, 1)
        return ops.area_downsample(out, factor).to(x.dtype)


@contextlib.contextmanager
def single_thread_if_small(values: int, device: torch.device, limit: int = SINGLE_THREAD_BELOW):
    """Run the block on one intra-op CPU thread when it handles fewer than `limit` values, then
    restore the thread count (torch's thread hand-offs dominate on tiny tensors)."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or values >= limit or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def levels(name: str) -> tuple:
    """The CIFAR-10-C constants of a corruption, one tuple per severity 1..5."""
    return _lookup(name).levels


def _lookup(name: str) -> Corruption:
    if name not in _TABLE:
        raise ValueError(f"corruption name {name!r} is unknown; choose from {', '.join(CORRUPTIONS)}")
    return _TABLE[name]


__all__ = [
    "CORRUPTIONS", "SEVERITIES", "apply_level", "corrupt", "levels", "single_thread_if_small",
    "working_factor",
]
