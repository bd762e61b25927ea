"""Noise corruptions. They act on single pixels, so they run at the image's own resolution.

Constants per severity 1..5 are CIFAR-10-C's (Hendrycks & Dietterich, `make_cifar_c.py`).
"""

import torch

GAUSSIAN_NOISE = ((0.04,), (0.06,), (0.08,), (0.09,), (0.10,))  # standard deviation
SHOT_NOISE = ((500,), (250,), (100,), (75,), (50,))  # photons per unit intensity: Poisson(x·c) / c
IMPULSE_NOISE = ((0.01,), (0.02,), (0.03,), (0.05,), (0.07,))  # fraction of values set to 0 or 1


def gaussian_noise(x, level, rng, scale):
    (std,) = level
    return x + std * rng.normal(0, x.shape[1:]).to(x)


def shot_noise(x, level, rng, scale):
    (photons,) = level
    return (rng.poisson(0, x * photons) / photons).to(x)


def impulse_noise(x, level, rng, scale):
    """Salt and pepper on every value (each channel separately, as skimage's random_noise does):
    with probability amount the value is replaced, by 1 or 0 with equal odds."""
    (amount,) = level
    u = rng.uniform(0, x.shape[1:])
    pepper, salt = u < amount / 2, (u >= amount / 2) & (u < amount)
    return torch.where(pepper, torch.zeros_like(x), torch.where(salt, torch.ones_like(x), x))
