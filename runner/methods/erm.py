"""Empirical risk minimisation: cross-entropy on the clean batch."""

from dataclasses import dataclass

import torch.nn.functional as F

from runner.config import MethodConfig
from runner.methods.base import Method


@dataclass
class Config(MethodConfig):
    name: str = "erm"


class ERM(Method):
    select_on = "clean"
    reported_checkpoint = "last"

    def loss(self, model, x, y, ctx):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}


def build(cfg):
    return ERM(cfg)
