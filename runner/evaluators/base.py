"""The one interface every evaluator implements; a suite is a list of evaluators."""

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class EvalContext:
    norm: str  # threat.norm
    eps: float  # threat.eps, pixel units
    device: torch.device
    seed: int  # evaluation seed (fixed, independent of the training seed unless set)
    batch_size: int
    run_dir: Path | None  # where plots/report artifacts may be written (None: write nothing)
    # Per-point correctness of earlier evaluators in the suite, e.g. {"clean": BoolTensor[N]}; later
    # evaluators read it (AutoAttack attacks only points still robust, checks compare certified <= robust).
    per_example: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # metrics of earlier evaluators in the suite


@dataclass
class EvalResult:
    metrics: dict = field(default_factory=dict)  # flat slash keys -> float, e.g. {"pgd/acc": 0.91}
    settings: dict = field(default_factory=dict)  # metric key -> {attack, steps, eps, n_examples, seed, time_s, ...}
    checks: list = field(default_factory=list)  # [{"name", "passed", "detail"}]
    per_example: dict = field(default_factory=dict)  # name -> BoolTensor[N] of per-point correctness


class Evaluator:
    """Built from one entry of the suite's `evaluators` list: `build(spec, cfg)` in its module."""

    name = "evaluator"

    def __init__(self, spec: dict, cfg):
        self.spec = spec
        self.cfg = cfg

    def supports(self, model) -> tuple[bool, str]:
        return True, ""

    def __call__(self, model, x, y, ctx: EvalContext) -> EvalResult:
        raise NotImplementedError


def check_keys(spec: dict, allowed, evaluator: str) -> None:
    """A suite entry with a key its evaluator does not read is a typo: fail before anything runs."""
    allowed = set(allowed) | {"name"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"eval.evaluators: {evaluator} got unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
