"""Filters and resampling shared by the corruptions, batched over N×C×H×W (no per-image loops).

Border modes are named after what they do: "edge" repeats the last pixel (skimage's 'nearest',
ImageMagick's default), "reflect101" mirrors about the border pixel (OpenCV's default, d c b | a b c d),
"symmetric" mirrors about the border edge (scipy/skimage 'reflect', c b a | a b c).
"""

import math

import torch
import torch.nn.functional as F


def pad_indices(n: int, before: int, after: int, mode: str, device=None) -> torch.Tensor:
    """Source index of every position of an axis of length n padded by (before, after)."""
    j = torch.arange(-before, n + after, device=device)
    if mode == "edge" or n == 1:
        return j.clamp(0, n - 1)
    if mode == "reflect101":
        period = 2 * n - 2
        m = j.remainder(period)
        return torch.where(m >= n, period - m, m)
    if mode == "symmetric":
        period = 2 * n
        m = j.remainder(period)
        return torch.where(m >= n, period - 1 - m, m)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: torch.Tensor, vertical: int, horizontal: int, mode: str) -> torch.Tensor:
    """Pad the last two axes by the given amounts on both sides; any amount, unlike F.pad's reflect."""
    rows = pad_indices(x.shape[-2], vertical, vertical, mode, x.device)
    cols = pad_indices(x.shape[-1], horizontal, horizontal, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def filter_matrix(n: int, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """(n, n) matrix of the same-size correlation of an axis of length n with an odd 1-D kernel,
    borders included: filtering becomes one small matmul per axis, exact, and fast on any device."""
    radius = len(kernel) // 2
    source = pad_indices(n, radius, radius, mode).unfold(0, len(kernel), 1)  # (n, taps)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.scatter_add_(1, source, kernel.double().expand(n, -1))
    return matrix


def correlate(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Same-size correlation of every channel with an odd-sized 2-D kernel (OpenCV's filter2D):
    one (row shift, row-filtered columns) matmul pair per kernel row."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for row, weights in enumerate(kernel):
        if torch.any(weights != 0):
            shift = torch.zeros(kernel.shape[0], dtype=torch.float64)
            shift[row] = 1.0
            out += resample_separable(x, filter_matrix(h, shift, mode), filter_matrix(w, weights, mode))
    return out


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    if sigma <= 0 or radius <= 0:
        return torch.ones(1, dtype=torch.float64)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    """Separable Gaussian blur with scipy's support rule: radius int(truncate·sigma + 0.5)."""
    kernel = gaussian_kernel1d(sigma, int(truncate * sigma + 0.5))
    if len(kernel) == 1:
        return x
    h, w = x.shape[-2:]
    return resample_separable(x, filter_matrix(h, kernel, mode), filter_matrix(w, kernel, mode))


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def area_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of nearest_upsample on images it produced (exact up to float rounding)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def linear_zoom_matrix(n: int, zoom: float) -> torch.Tensor:
    """(n, n) matrix of Hendrycks' `clipped_zoom` along one axis for zoom >= 1.

    The centre crop of ceil(n / zoom) pixels is stretched to round(crop · zoom) pixels by linear
    interpolation that maps first to first and last to last pixel (scipy.ndimage.zoom, order 1), and the
    centre n pixels are kept. A zoom too small to change the crop size is exactly the identity.
    """
    crop = math.ceil(n / zoom)
    top = (n - crop) // 2
    out_size = int(round(crop * zoom))
    trim = (out_size - n) // 2
    step = (crop - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = top + (torch.arange(n, dtype=torch.float64) + trim) * step
    return interpolation_matrix(source, n)


def interpolation_matrix(source: torch.Tensor, n_in: int) -> torch.Tensor:
    """Rows of linear-interpolation weights reading positions `source` (clamped) of an axis of n_in."""
    source = source.clamp(0, n_in - 1)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = source - low
    matrix = torch.zeros(len(source), n_in, dtype=torch.float64)
    rows = torch.arange(len(source))
    matrix[rows, low] += 1 - frac
    matrix[rows, high] += frac
    return matrix


def box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's BOX resampling along one axis (used by Hendrycks' pixelate).

    Each output pixel averages the input pixels whose centres fall in its footprint, widened to one
    input pixel when enlarging (then it is nearest-neighbour).
    """
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for out in range(n_out):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), n_in)
        for i in range(first, last):
            t = (i - centre + 0.5) / filter_scale
            if -0.5 < t <= 0.5:
                matrix[out, i] = 1.0
        matrix[out] /= matrix[out].sum()
    return matrix


def resample_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ image @ colsᵀ for every channel: a separable linear resampling, one matmul per axis."""
    return torch.matmul(torch.matmul(rows.to(x), x), cols.to(x).T)


def sample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear read of x at per-image pixel coordinates rows/cols of shape (N, H', W').

    padding: "border" (edge), "reflection" (reflect101: mirrored about the border pixel centres).
    """
    h, w = x.shape[-2:]
    grid = torch.stack([2 * cols / max(w - 1, 1) - 1, 2 * rows / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode=padding, align_corners=True)


def sum_of_shifts(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, weights) -> torch.Tensor:
    """Σ_t weights[t] · x(y + dy[t], x + dx[t]) with per-image shifts dy, dx of shape (taps, N) and
    edge padding. Whole-pixel shifts are gathers from one padded copy; fractional ones read bilinearly."""
    n, c, h, w = x.shape
    out = torch.zeros_like(x)
    if torch.equal(dy, dy.round()) and torch.equal(dx, dx.round()):
        margin = int(max(dy.abs().max().item(), dx.abs().max().item()))
        padded = pad(x, margin, margin, "edge").flatten(2)
        rows = torch.arange(h, device=x.device).view(h, 1) + margin
        cols = torch.arange(w, device=x.device).view(1, w) + margin
        base = (rows * (w + 2 * margin) + cols).view(1, 1, h * w)
        offsets = (dy.long() * (w + 2 * margin) + dx.long()).view(len(dy), n, 1, 1)
        flat_out = out.view(n, c, h * w)
        for offset, weight in zip(offsets, weights):
            flat_out.add_(padded.gather(2, (base + offset).expand(n, c, h * w)), alpha=float(weight))
        return out
    base_rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    base_cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    for shift_y, shift_x, weight in zip(dy, dx, weights):
        rows = (base_rows + shift_y.view(n, 1, 1)).expand(n, h, w)
        cols = (base_cols + shift_x.view(n, 1, 1)).expand(n, h, w)
        out += float(weight) * sample(x, rows, cols, "border")
    return out


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (OpenCV's RGB2GRAY), N×1×H×W; greyscale input is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def splat_points(size: int, positions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A size×size canvas with each weight spread bilinearly over the 4 pixels around its (row, col)
    position; the parts that fall outside are dropped."""
    canvas = torch.zeros(size, size, dtype=torch.float64)
    low = positions.double().floor()
    frac = positions.double() - low
    low = low.long()
    for corner_y in (0, 1):
        for corner_x in (0, 1):
            wy = frac[:, 0] if corner_y else 1 - frac[:, 0]
            wx = frac[:, 1] if corner_x else 1 - frac[:, 1]
            ys, xs = low[:, 0] + corner_y, low[:, 1] + corner_x
            inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
            canvas.index_put_((ys[inside], xs[inside]), (weights.double() * wy * wx)[inside], accumulate=True)
    return canvas


def splat(weights: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """A centred 2-D kernel from taps (weights (T,), offsets (T, 2) as (dy, dx)) moved to offsets·scale.

    Each tap lands bilinearly on the four nearest grid points, so a kernel designed on a 32-pixel
    image keeps its shape, sub-pixel, on a smaller one; scale 1 with integer offsets is exact.
    """
    positions = offsets.double() * scale
    radius = int(math.ceil(positions.abs().max().item())) if len(positions) else 0
    return splat_points(2 * radius + 1, positions + radius, weights)
