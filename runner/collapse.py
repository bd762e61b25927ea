"""Catastrophic-overfitting guard (Wong, Rice & Kolter 2020, "Fast is better than free").

FGSM-based training can lose its robustness within one epoch: the model learns to defeat the one-step
attack while multi-step attacks succeed on nearly every point. The reference guards against it by
measuring PGD accuracy on the first training batch of every epoch and stopping, with the model from
before, when it falls by more than 0.2 from the previous epoch. Here the measurement is the method's
own validation metric (`Method.validate`: PGD-10 accuracy for AT), taken in eval mode on that batch,
so the loop still never names a method. `train.collapse_drop` is the fall that counts; null is off.

"With the model from before": the guard keeps a copy of the weights (BatchNorm statistics included) after
every epoch that passed, and puts them back when an epoch collapses, so the final model (last.pt) is the
last good epoch's, as the reference's saved `best_state_dict` is. The copy travels in last.pt, so a
resumed run can still go back.
"""

import torch

from runner import distributed
from runner.methods.base import StepContext


class CollapseGuard:
    def __init__(self, drop: float | None):
        self.drop = drop
        self.previous: float | None = None  # the last epoch's score that did not collapse
        self.scores: list[float] = []  # per checked epoch, for results.json
        self.collapse: dict | None = None  # set once, when training stopped on a collapse
        self._batch = None
        self._kept: dict | None = None  # the model's state after the last epoch that did not collapse

    @property
    def enabled(self) -> bool:
        return self.drop is not None

    def remember(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the epoch's first batch (a copy: the loader may reuse its buffers)."""
        if self.enabled and self._batch is None:
            self._batch = (x.detach().clone(), y.detach().clone())

    def collapsed(self, method, model, ctx: StepContext, epoch: int, procs) -> bool:
        """Check the epoch just trained (rank 0 measures, every process gets its verdict); True: stop."""
        if not self.enabled:
            return False
        verdict = False
        if procs.is_main and self._batch is not None:
            was_training = model.training
            model.eval()
            score = float(method.validate(model, *self._batch, ctx)["val/score"])
            model.train(was_training)
            self.scores.append(score)
            if self.previous is not None and self.previous - score > self.drop:
                self.collapse = {"epoch": epoch + 1, "score": score, "previous": self.previous}
                verdict = True
            else:
                self.previous = score
        self._batch = None
        verdict = distributed.agree(verdict, procs)
        if not verdict:
            self._kept = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return verdict

    def restore(self, model) -> None:
        """After a collapse: the model of the last good epoch back in place (on every process)."""
        if self._kept is not None:
            model.load_state_dict(self._kept)
        if self.collapse is not None:  # rank 0's record of what the final model is
            self.collapse["restored_epoch"] = self.collapse["epoch"] - 1 if self._kept is not None else None

    def summary(self) -> dict | None:
        if not self.enabled:
            return None
        return {"drop": self.drop, "measured_on": "the first training batch of each epoch, eval mode",
                "scores": [round(s, 4) for s in self.scores], "collapse": self.collapse}

    def state_dict(self) -> dict:
        return {"previous": self.previous, "scores": list(self.scores), "collapse": self.collapse,
                "weights": self._kept}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.previous, self.collapse = state.get("previous"), state.get("collapse")
        self.scores = list(state.get("scores", []))
        self._kept = state.get("weights")
