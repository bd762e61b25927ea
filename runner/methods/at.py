"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples only.

With attack.steps = 1 and the default alpha (1.25·eps) this is FGSM-RS "fast AT" (Wong et al. 2020).
"""

from dataclasses import dataclass, field

import torch.nn.functional as F

from runner.attacks import model_mode, pgd
from runner.config import AttackConfig, MethodConfig
from runner.methods.base import Method, clean_batch_norm_pass


@dataclass
class Config(MethodConfig):
    name: str = "at"
    attack: AttackConfig = field(default_factory=AttackConfig)
    # One more, gradient-free, train-mode forward of the clean batch per step, for BatchNorm's running
    # statistics: Rice et al.'s loop (and Rice_HR.py) runs it after each step to log training accuracy, so
    # their evaluated models normalise with partly clean statistics. Madry et al.'s does not.
    clean_bn_pass: bool = False


class AT(Method):
    select_on = "pgd"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.clean_bn_pass = bool(cfg.method.clean_bn_pass)

    def after_step(self, model, x):
        if self.clean_bn_pass:  # after the step, on the updated weights, as Rice et al.'s loop
            clean_batch_norm_pass(model, x)

    def adversarial(self, model, x, y, ctx):
        """The training attack at attack.eps_factor · threat.eps, generated in `attack.bn_mode`."""
        a = self.cfg.method.attack

        def attack():
            with model_mode(model, a.bn_mode):
                return pgd(
                    model, x, y, eps=a.eps_factor * ctx.eps, norm=ctx.norm, steps=a.steps, alpha=a.alpha,
                    restarts=a.restarts, init="uniform" if a.random_start else "zero",
                )

        return self.reusable_attack(x, ctx, attack)

    def loss(self, model, x, y, ctx):
        x_adv = self.adversarial(model, x, y, ctx)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "train_robust_acc": (logits.argmax(1) == y).float().mean()}


def build(cfg):
    return AT(cfg)
