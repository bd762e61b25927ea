"""Building blocks every model is made of, and that the bounds module knows how to propagate.

Models are nn.Sequential stacks of standard torch layers plus the two modules below, so that
attacks, interval bounds and CROWN all walk the same, explicit structure.
"""

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as the model's first layer: inputs stay in [0, 1] pixel units."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """out = main(x) + shortcut(x); `shortcut` is nn.Identity when shapes already agree."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return self.main(x) + self.shortcut(x)
