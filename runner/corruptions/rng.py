"""Counter-based random numbers: every draw is a pure function of (seed, corruption, severity, image, draw).

A stateful generator (torch.Generator) makes image i's noise depend on how many images came before it in
the batch; hashing counters does not. Image i of a set always gets the same corruption whether it is
corrupted alone, in a batch of 7 or in the full test set, on CPU or GPU (integer hashing is exact; Poisson
samples are drawn on the CPU).

The bit mixer is Wellons' "lowbias32" 32-bit integer hash (shifts 16/15/16), evaluated in int64 with the
multiplications split into 16-bit halves so that no intermediate value overflows on any device.
"""

import math

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9  # keeps counter 0 from hashing like key 0


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, exact for Python ints and int64 tensors alike.

    A product below 2**63 cannot overflow int64, so a multiplier c >= 2**31 is applied as the negation
    of x * (2**32 - c), which agrees with x * c modulo 2**32.
    """
    if c < 2**31:
        return (x * c) & _MASK32
    return (-(x * (2**32 - c))) & _MASK32


def hash32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL_B)
    return x ^ (x >> 16)


def combine(key, value):
    """A new 32-bit key from an existing key and a counter (ints or int64 tensors)."""
    return hash32(key ^ hash32((value + _GOLDEN) & _MASK32))


def derive_key(*parts: int) -> int:
    """A 32-bit key from any number of non-negative Python ints (seeds may exceed 32 bits)."""
    key = 0
    for part in parts:
        if part < 0:
            raise ValueError(f"random-stream key parts must be non-negative, got {part}")
        while True:  # fold every 32-bit limb in, so seeds 2**32 apart differ
            key = combine(key, part & _MASK32)
            part >>= 32
            if part == 0:
                break
    return key


class ImageStreams:
    """Independent random streams for images first_index .. first_index + n - 1 of a data set.

    Each call names a `draw` (an int distinct per use inside one corruption) and returns values of
    shape (n, *shape); draw d of image i is the same tensor whatever else is in the batch.
    """

    def __init__(self, key: int, first_index: int, n: int, device):
        self.device = torch.device(device)
        indices = torch.arange(first_index, first_index + n, dtype=torch.int64, device=self.device)
        self.image_keys = combine(torch.full_like(indices, key), indices & _MASK32)
        self.n = n

    def bits(self, draw: int, shape: tuple) -> torch.Tensor:
        """Uniform 32-bit integers (as int64), shape (n, *shape)."""
        size = math.prod(shape)
        if size >= 2**32:
            raise ValueError(f"a single draw is limited to 2**32 values per image, asked for {size}")
        draw_keys = combine(self.image_keys, draw)
        counters = hash32(torch.arange(size, dtype=torch.int64, device=self.device))
        return hash32(draw_keys[:, None] ^ counters[None, :]).view(self.n, *shape)

    def uniform(self, draw: int, shape: tuple = ()) -> torch.Tensor:
        """float64 in the open interval (0, 1), so that log(u) is always finite."""
        return (self.bits(draw, shape).double() + 0.5) * 2.0**-32

    def normal(self, draw: int, shape: tuple = ()) -> torch.Tensor:
        """Standard normal float64 (Box-Muller on two uniform fields)."""
        u = self.uniform(draw, (2, *shape))
        return torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])

    def integers(self, draw: int, low: int, high: int, shape: tuple = ()) -> torch.Tensor:
        """Uniform integers in [low, high) (numpy's randint convention), int64; the modulo bias is
        below (high - low) / 2**32."""
        return low + self.bits(draw, shape) % (high - low)

    def poisson(self, draw: int, rate: torch.Tensor) -> torch.Tensor:
        """Poisson(rate) samples, rate of shape (n, ...) >= 0, as float64 of that shape.

        torch has no Poisson sampler driven by counters, and an exact vectorised one (inversion plus
        transformed rejection) ran ~30× slower than torch.poisson on CPU; so this is the one per-image
        loop: torch.poisson with a generator seeded by the image's own key, which keeps every sample
        independent of the rest of the batch. The samples are always drawn on the CPU (a CUDA generator
        gives other numbers from the same seed) and moved to the rate's device: the same corruption on
        either device.
        """
        seeds = combine(self.image_keys, draw).tolist()
        rate_cpu = rate.double().cpu()
        out = torch.empty_like(rate_cpu)
        for i, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            out[i] = torch.poisson(rate_cpu[i], generator=generator)
        return out.to(rate.device)
