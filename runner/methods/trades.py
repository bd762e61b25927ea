"""TRADES (Zhang et al. 2019; yaodongyu/TRADES `trades_loss`).

Attack (model in `attack.bn_mode`, eval by default as in the reference): start at x + 0.001·N(0, I),
ascend KL(softmax(f(x)) ‖ softmax(f(x'))) with the shared PGD (projected and clamped every step, last
iterate). Loss (train mode): CE(f(x), y) + β·KL(softmax(f(x)) ‖ softmax(f(x'))), batchmean, with the
clean softmax not detached, so the KL term also pulls f(x) towards f(x').

The reference forwards the clean batch twice in train mode (once for CE, once for the KL target). The
gradients are the same with one forward, which this module uses, followed by a gradient-free clean
forward: BatchNorm's running statistics then see the reference's clean, adversarial, clean sequence
(with one clean forward they end up ~47% clean instead of ~67%, and the evaluated model normalises with
them). Without BatchNorm that forward is skipped.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runner.attacks import model_mode, pgd
from runner.config import AttackConfig, MethodConfig
from runner.methods.base import Method, clean_batch_norm_pass


@dataclass
class Config(MethodConfig):
    name: str = "trades"
    beta: float = 6.0  # weight of the KL (robustness) term
    attack: AttackConfig = field(default_factory=AttackConfig)


def kl_per_example(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) ‖ softmax(adv)) for each example, computed in float32 (bf16-safe)."""
    clean_log_probs = F.log_softmax(clean_logits.float(), dim=1)
    adv_log_probs = F.log_softmax(adv_logits.float(), dim=1)
    return (clean_log_probs.exp() * (clean_log_probs - adv_log_probs)).sum(1)


class TRADES(Method):
    select_on = "pgd"
    reported_checkpoint = "last"
    awp_gamma = 0.005  # TRADES-AWP (csdongxian/AWP, trades_AWP)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.method.beta < 0:
            raise ValueError(f"method.beta must be >= 0, got {cfg.method.beta}")
        if not cfg.method.attack.random_start:
            # KL(f(x) || f(x')) has a zero gradient at x' = x: a PGD started there never moves.
            raise ValueError(
                "method.attack.random_start must be true for TRADES: its KL attack can't start at x"
            )

    def adversarial(self, model, x, y, ctx):
        return self.reusable_attack(x, ctx, lambda: self._kl_attack(model, x, y, ctx))

    def _kl_attack(self, model, x, y, ctx):
        a = self.cfg.method.attack
        with model_mode(model, a.bn_mode), torch.no_grad():
            clean_logits = model(x)

        def kl_to_clean(adv_logits, _y):
            return kl_per_example(clean_logits, adv_logits)

        with model_mode(model, a.bn_mode):
            return pgd(
                model,
                x,
                y,
                eps=a.eps_factor * ctx.eps,
                norm=ctx.norm,
                steps=a.steps,
                alpha=a.alpha,
                restarts=a.restarts,
                init="normal",  # random_start is required (see __init__)
                loss_fn=kl_to_clean,
            )

    def loss(self, model, x, y, ctx):
        x_adv = self.adversarial(model, x, y, ctx)
        # Separate clean and adversarial forwards, as in the reference: one concatenated batch would mix their
        # BN statistics (the reference's third, a second clean forward for the KL target, is the same graph).
        clean_logits, adv_logits = model(x), model(x_adv)
        natural = F.cross_entropy(clean_logits, y)
        robust = kl_per_example(clean_logits, adv_logits).mean()  # batchmean
        loss = natural + self.cfg.method.beta * robust
        clean_batch_norm_pass(model, x)
        return loss, {
            "loss": loss.detach(),
            "loss_natural": natural.detach(),
            "loss_robust": robust.detach(),
            "train_acc": (clean_logits.argmax(1) == y).float().mean(),
            "train_robust_acc": (adv_logits.argmax(1) == y).float().mean(),
        }


def build(cfg):
    return TRADES(cfg)
