"""The one interface every training method implements; the training loop only ever sees this."""

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn


@dataclass
class StepContext:
    """Where training stands, for methods whose behaviour follows a schedule (IBP's eps ramp, ...)."""

    epoch: int  # 0-based epoch of the current batch
    step: int  # 0-based global optimisation step of the current batch
    steps_per_epoch: int
    total_steps: int
    norm: str  # threat.norm: "linf" | "l2"
    eps: float  # threat.eps, pixel units
    reuse_attack: bool = False  # SAM's second pass with method.sam_attack=reuse (see Method.reusable_attack)


def clean_batch_norm_pass(model: nn.Module, x: torch.Tensor) -> None:
    """A gradient-free train-mode forward of the clean batch, for its effect on BatchNorm's running
    statistics alone. Reference loops that run one (TRADES computes the clean logits twice; Rice et al.'s
    loop logs training accuracy after each step) leave running statistics that are partly clean, and the
    evaluated model normalises with them. Nothing to do without running statistics."""
    if model.training and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    ):
        with torch.no_grad():
            model(x)


class Method:
    """A training method: a loss on one batch. The update rule (plain or SAM) wraps it.

    `loss` is called with the model in train mode and must leave it in train mode. It may be called
    twice on the same batch (SAM's second pass), so it must not keep state that a second call breaks.
    """

    # What best.pt selection maximises on the validation split: "clean", "pgd" or "certified".
    select_on = "clean"
    # The checkpoint eval.checkpoint=auto evaluates: the one the method's reference reports. "best" is
    # early stopping on the validation score (Rice et al.'s protocol for AT); "last" the final model of a
    # fixed schedule (ERM, SAM, TRADES: their references select nothing on held-out data).
    reported_checkpoint = "best"
    # AWP's gamma when method.awp_gamma is null: the reference's value for this loss (Wu et al.: AT 0.01).
    awp_gamma = 0.01

    def __init__(self, cfg):
        self.cfg = cfg
        self._last_attack = None  # (batch, its adversarial batch): what SAM's second pass may reuse

    def reusable_attack(self, x: torch.Tensor, ctx: StepContext, attack) -> torch.Tensor:
        """`attack()`'s adversarial batch; on SAM's second pass with method.sam_attack=reuse, the one the
        first pass made for this same batch instead (AWP-style: the attack is solved at w only)."""
        if ctx.reuse_attack and self._last_attack is not None and self._last_attack[0] is x:
            return self._last_attack[1]
        x_adv = attack()
        self._last_attack = (x, x_adv)
        return x_adv

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
        """The batch's training attack (methods with one override this; None: the method has none). Solved
        through `reusable_attack`, so a `loss` called next with ctx.reuse_attack uses it instead of its own."""
        return None

    def schedule_warnings(self, steps_per_epoch: int, epochs: int) -> list[str]:
        """What the run's length leaves undone of the method's own schedule (logged and kept in results.json)."""
        return []

    def setup(self, model: nn.Module) -> None:
        """Called once on a freshly built model before the first step (never on resume)."""

    def after_step(self, model: nn.Module, x: torch.Tensor) -> None:
        """Called by the update rule right after the optimizer's step on batch `x` (and after SAM's or AWP's
        weights are back), for what a reference loop does between steps. Nothing by default."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
        """Return (scalar loss tensor, dict of floats or 0-d tensors to log)."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict:
        """Validation metrics for best.pt selection; `val/score` is what selection maximises.

        Called with the model in eval mode on the held-out validation split (never the test split).
        PGD runs in batches of eval.batch_size (the evaluation attacks' memory budget; the whole split when
        the config has no eval section). The random starts come from the global generator batch after
        batch: on a CPU, L-inf starts are then the very numbers one batch would draw (uniform draws are
        sequential); L2 starts (normal, then uniform radii, per batch) and CUDA draws differ from one
        batch's but are drawn from the same distribution.
        """
        from runner.attacks import pgd, predict

        correct = predict(model, x) == y
        metrics = {"val/clean_acc": correct.float().mean().item()}
        metrics["val/score"] = metrics["val/clean_acc"]
        if self.select_on == "pgd" and ctx.eps > 0:
            step = OmegaConf.select(self.cfg, "eval.batch_size") or max(1, len(y))
            # x itself lies in the ball: robust means correct there too, as the test-time evaluator counts it.
            robust = correct.clone()
            for start in range(0, len(y), step):
                xb, yb = x[start : start + step], y[start : start + step]
                with torch.enable_grad():
                    x_adv = pgd(model, xb, yb, eps=ctx.eps, norm=ctx.norm, steps=10)
                robust[start : start + step] &= predict(model, x_adv) == yb
            metrics["val/pgd_acc"] = robust.float().mean().item()
            metrics["val/score"] = metrics["val/pgd_acc"]
        return metrics
