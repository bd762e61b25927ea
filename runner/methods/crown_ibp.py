"""CROWN-IBP certified training (Zhang et al. 2020): IBP training whose robust loss uses the margin
lower bound β·m_CROWN-IBP + (1 − β)·m_IBP, where the CROWN backward pass relaxes each ReLU with IBP's
intermediate bounds. β = beta_start + (beta_end − beta_start)·eps_t/eps_train follows the ε ramp
(1 -> 0 in the reference, so training ends on pure IBP); the CROWN pass is skipped once β is 0.
Everything else (schedules, κ, initialisation, regulariser) is IBP's.
"""

from dataclasses import dataclass

from runner import bounds
from runner.methods.ibp import IBP
from runner.methods.ibp import Config as IBPConfig


@dataclass
class Config(IBPConfig):
    name: str = "crown_ibp"
    beta_start: float = 1.0
    beta_end: float = 0.0


class CROWNIBP(IBP):
    bound_method = "crown_ibp"

    def __init__(self, cfg):
        super().__init__(cfg)
        for key in ("beta_start", "beta_end"):
            if not 0 <= cfg.method[key] <= 1:
                raise ValueError(f"method.{key} must be in [0, 1], got {cfg.method[key]}")

    def beta(self, eps_t: float, eps_train: float) -> float:
        m = self.cfg.method
        progress = eps_t / eps_train if eps_train > 0 else 1.0
        return m.beta_start + (m.beta_end - m.beta_start) * progress

    def robust_bounds(self, model, x, y, eps, bn_stats, relu_inputs, step_ctx):
        ibp_lower = bounds.ibp_margin_bounds(model, x, y, eps, bn_stats=bn_stats, relu_inputs=relu_inputs)
        beta = self.beta(eps, self.cfg.method.eps_factor * step_ctx.eps)
        if beta <= 1e-5:
            return ibp_lower, {"beta": beta}
        crown_lower = bounds.crown_margin_bounds(model, x, y, eps, bn_stats=bn_stats, intermediate="ibp")
        return beta * crown_lower + (1 - beta) * ibp_lower, {"beta": beta}


def build(cfg):
    return CROWNIBP(cfg)
