"""Sound bounds on a model's outputs over an eps-ball: IBP, CROWN-IBP and CROWN. One module used by
certified training (runner.methods.ibp, crown_ibp) and by certification (runner.evaluators.certified).

All functions take inputs in [0, 1] pixel units (normalisation is the model's first layer) and bound
the L∞ box [max(x - eps, 0), min(x + eps, 1)].
"""

import torch
import torch.nn.functional as F
from torch import nn

from runner.bounds.crown import crown_margin_bounds
from runner.bounds.graph import (
    METHODS,
    UnsupportedModel,
    flatten_layers,
    forward_with_bn_stats,
    supports,
    uses_batch_statistics,
)
from runner.bounds.ibp import (
    ibp_margin_bounds,
    input_box,
    interval_bounds,
    interval_step,
    margin_spec,
    propagate,
)
from runner.bounds.tightness import ibp_tightness

__all__ = [
    "METHODS",
    "UnsupportedModel",
    "certified_mask",
    "crown_margin_bounds",
    "flatten_layers",
    "forward_with_bn_stats",
    "ibp_margin_bounds",
    "ibp_tightness",
    "input_box",
    "interval_bounds",
    "interval_step",
    "margin_lower_bounds",
    "margin_spec",
    "propagate",
    "robust_cross_entropy",
    "supports",
    "uses_batch_statistics",
    "worst_case_logits",
]


def margin_lower_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    method: str = "ibp",
    bn_stats: dict | None = None,
) -> torch.Tensor:
    """Lower bounds [B, K] of z_y - z_j over the eps-box (column y = 0), by ibp | crown_ibp | crown."""
    if method == "ibp":
        return ibp_margin_bounds(model, x, y, eps, norm, bn_stats)
    if method == "crown_ibp":
        return crown_margin_bounds(model, x, y, eps, norm, bn_stats, intermediate="ibp")
    if method == "crown":
        return crown_margin_bounds(model, x, y, eps, norm, bn_stats, intermediate="crown")
    raise ValueError(f"bound method must be one of {METHODS}, got {method!r}")


def certified_mask(margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True where every margin z_y - z_j (j != y) is provably positive."""
    others = margin_lower.scatter(1, y[:, None], float("inf"))
    return (others > 0).all(1)


def worst_case_logits(margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-lower margin bounds, true class at exactly 0: the logits of the robust cross-entropy."""
    return (-margin_lower).scatter(1, y[:, None], 0.0)


def robust_cross_entropy(margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(worst_case_logits(margin_lower, y), y)
