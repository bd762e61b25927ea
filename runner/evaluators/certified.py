"""Certified accuracy at threat.eps by IBP, CROWN-IBP and CROWN, and their union.

A point counts as certified by a method when every margin z_y − z_j has a positive lower bound over
the box [max(x − eps, 0), min(x + eps, 1)]; `certified/acc` counts a point certified by any of the
sound methods run. Each method's time and n are recorded in its settings. A method that cannot bound
the model (CROWN on a residual network, or a network too wide for full CROWN within `crown_max_neurons`
per layer) is listed as unsupported in the checks and in `certified/acc`'s settings, never dropped
silently. Per point: `certified` (the union) plus `certified_<method>`.
"""

import time

import torch
from torch import nn

from runner import bounds
from runner.evaluators.base import EvalResult, Evaluator, check_keys

METHODS = bounds.METHODS
KEYS = {"name", "methods", "batch_size", "crown_batch_size", "crown_max_neurons", "tightness"}


def widest_relu_layer(model: nn.Module, x: torch.Tensor) -> int:
    """Neurons in the widest ReLU input of a feed-forward model (full CROWN bounds each of them)."""
    widest, activation = 0, x[:1].clone()
    with torch.no_grad():
        for layer in bounds.flatten_layers(model):
            if isinstance(layer, nn.ReLU):
                widest = max(widest, activation[0].numel())
            activation = layer(activation)
    return widest


class Certified(Evaluator):
    name = "certified"

    def __init__(self, spec, cfg):
        super().__init__(spec, cfg)
        self.methods = list(spec.get("methods", bounds.METHODS))
        unknown = [m for m in self.methods if m not in bounds.METHODS]
        if unknown or not self.methods:
            raise ValueError(f"eval.evaluators: certified.methods must be a non-empty subset of {METHODS}")
        for key in ("batch_size", "crown_batch_size", "crown_max_neurons"):
            if spec.get(key) is not None and int(spec[key]) <= 0:
                raise ValueError(f"eval.evaluators: certified.{key} must be positive, got {spec[key]}")

    def supports(self, model):
        norm = self.cfg.threat.norm if self.cfg is not None else "linf"
        if norm != "linf":
            return False, f"certified: threat.norm={norm!r} is not supported (the bounds certify linf boxes)"
        return bounds.supports(model, "ibp") if "ibp" in self.methods else (True, "")

    def unsupported_reason(self, model, method: str, x: torch.Tensor) -> str:
        ok, reason = bounds.supports(model, method)
        if not ok:
            return reason
        limit = self.spec.get("crown_max_neurons", 20000)
        if method == "crown" and limit is not None:
            widest = widest_relu_layer(model, x)
            if widest > limit:
                return (
                    f"crown: a ReLU layer has {widest} neurons, over crown_max_neurons={limit} "
                    "(full CROWN bounds every one of them)"
                )
        return ""

    def batch_size(self, method: str, ctx) -> int:
        """CROWN's coefficient tensors are [batch, rows, *layer shape]: it runs on smaller batches."""
        if method != "ibp" and self.spec.get("crown_batch_size") is not None:
            return int(self.spec["crown_batch_size"])
        return int(self.spec.get("batch_size") or ctx.batch_size)

    @torch.no_grad()
    def certify(self, model, x, y, eps, method, batch_size) -> torch.Tensor:
        masks = []
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            lower = bounds.margin_lower_bounds(model, xb, yb, eps, method=method)
            masks.append(bounds.certified_mask(lower, yb))
        return torch.cat(masks)

    def __call__(self, model, x, y, ctx):
        if ctx.norm != "linf":
            raise NotImplementedError(f"eval certified: threat.norm={ctx.norm!r}; only linf is certified")
        result = EvalResult()
        union = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        ran, unsupported = [], {}
        for method in self.methods:
            reason = self.unsupported_reason(model, method, x)
            if reason:
                unsupported[method] = reason
                result.checks.append(
                    {"name": f"certified/{method} applicable", "passed": True, "skipped": True,
                     "detail": f"not run: {reason}"}
                )
                continue
            start = time.perf_counter()
            batch_size = self.batch_size(method, ctx)
            mask = self.certify(model, x, y, ctx.eps, method, batch_size)
            key = f"certified/{method}/acc"
            result.metrics[key] = mask.float().mean().item()
            result.settings[key] = {
                "verifier": method,
                "norm": ctx.norm,
                "eps": ctx.eps,
                "eps_255": round(ctx.eps * 255, 3),
                "n_examples": len(y),
                "batch_size": batch_size,
                "time_s": round(time.perf_counter() - start, 3),
            }
            result.per_example[f"certified_{method}"] = mask.cpu()
            union |= mask
            ran.append(method)
        if ran:
            result.metrics["certified/acc"] = union.float().mean().item()
            result.settings["certified/acc"] = {
                "verifier": "union",
                "methods": ran,
                "unsupported": unsupported,
                "norm": ctx.norm,
                "eps": ctx.eps,
                "eps_255": round(ctx.eps * 255, 3),
                "n_examples": len(y),
                "time_s": round(sum(result.settings[f"certified/{m}/acc"]["time_s"] for m in ran), 3),
            }
            result.per_example["certified"] = union.cpu()
            result.checks.append(self.correctness_check(model, x, y, union, ctx))
        if self.spec.get("tightness", True):
            self.add_tightness(model, x, y, ctx, result)
        return result

    @torch.no_grad()
    def correctness_check(self, model, x, y, union, ctx) -> dict:
        """A certificate covers x itself, so every certified point must be classified correctly."""
        if "clean" in ctx.per_example:
            correct = ctx.per_example["clean"].to(union.device)
        else:
            step = ctx.batch_size
            correct = torch.cat([model(x[i : i + step]).argmax(1) for i in range(0, len(y), step)]) == y
        bad = int((union & ~correct).sum())
        return {
            "name": "certified <= clean per point",
            "passed": bad == 0,
            "detail": f"{bad} certified points are misclassified",
        }

    @torch.no_grad()
    def add_tightness(self, model, x, y, ctx, result) -> None:
        start, values = time.perf_counter(), []
        for i in range(0, len(y), ctx.batch_size):
            tightness = bounds.ibp_tightness(model, x[i : i + ctx.batch_size], y[i : i + ctx.batch_size])
            if tightness is None:
                return
            values.append(tightness)
        result.metrics["certified/tightness"] = torch.cat(values).mean().item()
        result.settings["certified/tightness"] = {
            "metric": "Mao et al. 2024: exact / IBP box radius of the network linearised at x",
            "n_examples": len(y),
            "time_s": round(time.perf_counter() - start, 3),
        }


def build(spec, cfg):
    check_keys(spec, KEYS, "certified")
    return Certified(spec, cfg)
