"""HR: holistic robust training (Bennouna, Lucas, Van Parys, ICML 2023).

Per batch: per-sample losses (on PGD examples at threat.eps, generated in `attack.bn_mode`, when eps > 0),
reweighted by the worst-case distribution of `runner.hr.hr_weights` (α: poisoning, r: statistical error).
The weights are constants in the backward pass (Danskin). HR is AT with a reweighted mean, so it reuses
AT's attack; with α = r = 0 it is AT, step for step.
"""

import math
from dataclasses import dataclass

import torch.nn.functional as F

from runner import distributed
from runner.hr import check_parameters, hr_weights, weight_stats
from runner.methods.at import AT
from runner.methods.at import Config as ATConfig


@dataclass
class Config(ATConfig):
    name: str = "hr"
    alpha: float = 0.0  # mass an adversary may have corrupted (poisoning), in [0, 1)
    r: float = 0.0  # KL radius against statistical error, >= 0


class HR(AT):
    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        check_parameters(m.alpha, m.r)
        self.alpha, self.r = float(m.alpha), float(m.r)  # read once: config access costs per step

    def loss(self, model, x, y, ctx):
        if self.alpha == 0 and self.r == 0:  # uniform weights: exactly AT's loss (same ops, same result)
            loss, logs = super().loss(model, x, y, ctx)
            n = len(y)
            return loss, {**logs, "hr/max_weight": 1.0 / n, "hr/weight_entropy": math.log(n)}
        x_adv = self.adversarial(model, x, y, ctx)
        logits = model(x_adv)
        per_example = F.cross_entropy(logits, y, reduction="none")
        # The weights couple the whole batch: under several processes they are computed on the global
        # batch's losses. This share's part of Σ p_i ℓ_i is returned as a share mean (× global / share
        # size), which is what the multi-process wrapper rescales to the global mean.
        global_losses, start = distributed.gather_batch(per_example.detach())
        global_weights, _ = hr_weights(global_losses, self.alpha, self.r)
        weights = global_weights[start : start + len(y)] * (len(global_losses) / len(y))
        loss = (weights.to(per_example.dtype) * per_example).sum()
        return loss, {
            "loss": loss.detach(),
            "loss_mean": per_example.detach().mean(),
            "train_robust_acc": (logits.argmax(1) == y).float().mean(),
            **weight_stats(global_weights),
        }


def build(cfg):
    return HR(cfg)
