"""The tightness metric of Mao et al. (2024, "Understanding certified training with interval bound
propagation"): fix every ReLU to its pattern at the clean input, so the network becomes a deep linear
network M (per example, margins = M·x + const). The exact radius of M's output over a box of radius
r is |M|·r; IBP's radius for the same linear network is |W_L| D_{L-1} ... D_1 |W_1|·r. Their ratio is
in (0, 1], with 1 when IBP is exact. It does not depend on the scale of r, so r = 1 is used and the
metric is defined during an eps = 0 warm-up as well.
"""

import torch
from torch import nn

from runner.bounds.crown import _transpose
from runner.bounds.graph import CHANNEL_AFFINE, POOLING, channel_affine, channel_view, check_supported
from runner.bounds.ibp import interval_step, margin_spec


def _abs_step(layer, radius, pattern, bn_stats):
    """IBP's radius map of the linear network: |W| r for affine layers, D r for ReLU."""
    if isinstance(layer, nn.ReLU):
        return radius * pattern
    if isinstance(layer, CHANNEL_AFFINE):
        scale, _ = channel_affine(layer, bn_stats)
        return radius * channel_view(scale, radius.dim()).abs()
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        _, out = interval_step(layer, torch.zeros_like(radius), radius, bn_stats)
        return out
    if isinstance(layer, (nn.Flatten, *POOLING)):
        return layer(radius)
    return radius


@torch.no_grad()
def ibp_tightness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn_stats: dict | None = None):
    """Per-example tightness [B] (mean over the margins j != y); None for models CROWN cannot walk."""
    try:
        layers = check_supported(model, "crown_ibp")
    except ValueError:
        return None
    activation, radius = x, torch.ones_like(x)
    patterns, in_shapes = {}, []
    for index, layer in enumerate(layers[:-1]):
        in_shapes.append(activation.shape[1:])
        if isinstance(layer, nn.ReLU):
            patterns[index] = (activation > 0).to(x.dtype)
        radius = _abs_step(layer, radius, patterns.get(index), bn_stats)
        activation, _ = interval_step(layer, activation, torch.zeros_like(activation), bn_stats)
    last = layers[-1]
    spec = margin_spec(y, last.out_features, last.weight.dtype)
    folded = spec @ last.weight  # [B, K, hidden]
    ibp_radius = (folded.abs() @ radius.unsqueeze(-1)).squeeze(-1)
    coeffs, bias = folded, folded.new_zeros(folded.shape[:2])
    for index in range(len(layers) - 2, -1, -1):
        if index in patterns:
            coeffs = coeffs * patterns[index].unsqueeze(1)
        else:
            coeffs, bias = _transpose(layers[index], coeffs, bias, in_shapes[index], bn_stats)
    exact_radius = coeffs.abs().flatten(2).sum(-1)
    other = torch.ones_like(ibp_radius, dtype=torch.bool).scatter(1, y[:, None], False)
    ratio = exact_radius / ibp_radius.clamp_min(1e-30)
    # A margin that no input can move (zero IBP radius) is exactly bounded: tightness 1.
    ratio = torch.where(ibp_radius > 0, ratio, torch.ones_like(ratio))
    return (ratio * other).sum(1) / other.sum(1)
