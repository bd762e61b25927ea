"""Update rules: one optimisation step around any method's loss.

`build_update(cfg, model, optimizer)` returns the plain rule, SAM/ASAM when `cfg.method.sam` is true
(Foret et al. 2021; davda54/sam; Kwon et al. 2021), or AWP when `cfg.method.awp` is (runner/awp.py). The
training loop calls `update(model, method, x, y, ctx)` once per batch and owns the scheduler, which stays
attached to the base optimizer: SAM and AWP only change which gradient that optimizer sees.

A non-finite loss never reaches the optimizer: the step is skipped and the logs carry
`nonfinite: 1.0`, so the loop applies `cfg.train.nonfinite` (stop or skip).
"""

import contextlib
import dataclasses

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from runner.config import DatasetConfig


def loss_context(precision: str, device_type: str):
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {precision!r}")


def is_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss.detach()).all())


def loggable(logs: dict, loss: torch.Tensor) -> dict:
    out = dict(logs)
    out["loss"] = loss.detach().float()
    return out


class Update:
    """Plain update: zero_grad, loss, backward, optional global-norm clip, optimizer step."""

    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.grad_clip = cfg.train.grad_clip
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip must be positive or null, got {self.grad_clip}")
        self.precision = cfg.train.precision
        loss_context(self.precision, "cpu")  # validate the key at build time, not at the first step

    def _forward(self, model, method, x, y, ctx):
        with loss_context(self.precision, x.device.type):
            loss, logs = method.loss(model, x, y, ctx)
        return loss.float(), logs

    def _clip(self, model: nn.Module) -> dict:
        if self.grad_clip is None:
            return {}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        return {"grad_norm": norm.detach()}

    def __call__(self, model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, ctx) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self._forward(model, method, x, y, ctx)
        if not is_finite(loss):
            return {**loggable(logs, loss), "nonfinite": 1.0}
        loss.backward()
        logs = {**loggable(logs, loss), **self._clip(model)}
        self.optimizer.step()
        method.after_step(model, x)
        return logs

    def schedule_warnings(self, epochs: int) -> list[str]:
        """What the run's length leaves undone of the rule's own schedule (as Method.schedule_warnings)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BatchNorm layers still normalise with the batch's statistics, but their running statistics
    (mean, var and the batch counter, so momentum=None layers are covered too) come out unchanged."""
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None:
            saved.append(
                (
                    module,
                    module.running_mean.clone(),
                    module.running_var.clone(),
                    module.num_batches_tracked.clone(),
                )
            )
    try:
        yield
    finally:
        with torch.no_grad():
            for module, mean, var, count in saved:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(count)


class SAMUpdate(Update):
    """Two passes on the same batch (Foret et al.): g = ∇L(w); e = ρ g/‖g‖ (ASAM: ρ T²g/‖Tg‖);
    g' = ∇L(w + e) with BN running statistics frozen; restore w; clip g' only; base step with g'.

    ASAM's T is diagonal, and its two references differ: davda54/sam scales every parameter by |w|;
    SamsungLabs/ASAM by |w| + η, on the parameters named `weight` only (T = 1 for biases), with η 0.01 in
    its class and 0 in its CIFAR example. `method.asam_scale` (all | weights) and `method.asam_eta` pick."""

    def __init__(self, cfg, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(cfg, model, optimizer)
        self.adaptive = bool(cfg.method.adaptive)
        self.reuse_attack = cfg.method.get("sam_attack", "rerun") == "reuse"
        self.rho = sam_rho(cfg)
        if self.rho <= 0:
            raise ValueError(f"method.rho must be positive, got {self.rho}")
        self.eta = float(cfg.method.get("asam_eta", 0.0))
        self.scale_all = cfg.method.get("asam_scale", "all") == "all"
        self.m = cfg.method.get("sam_m")
        if self.m is not None:
            if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
                raise ValueError(f"method.sam_m must be a positive number of images or null, got {self.m!r}")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                raise ValueError("method.sam_m splits one process's batch; under torchrun each process already "
                                 "perturbs on its own share of the batch (m = global batch / processes): add "
                                 "method.sam_m=null")

    def _params(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]

    def _scale(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        """ASAM's T for one parameter (None: the identity)."""
        if not self.adaptive or not (self.scale_all or "weight" in name.rsplit(".", 1)[-1]):
            return None
        return p.abs().add_(self.eta) if self.eta else p.abs()

    @torch.no_grad()
    def perturbation(self, params: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """e for each (name, parameter), from the gradients currently stored in `.grad`."""
        scales = [self._scale(name, p) for name, p in params]
        scaled = [p.grad if t is None else t * p.grad for (_, p), t in zip(params, scales)]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = self.rho / (grad_norm + 1e-12)
        # ASAM: T·(T g)·scale = T² g · ρ/‖T g‖.
        return [(s if t is None else t * s) * scale for s, t in zip(scaled, scales)]

    def _perturbed_gradient(self, model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, ctx):
        """Both passes on one batch: leaves g' = ∇L(w + e) in `.grad` and w restored. Returns (logs of the
        first pass, its loss, the perturbed loss, whether both were finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        # Under DDP the first gradient is a local direction only: skip its all-reduce.
        no_sync = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            loss, logs = self._forward(model, method, x, y, ctx)
            if not is_finite(loss):
                return logs, loss, loss.detach(), False
            loss.backward()
        named = self._params(model)
        perturbation = self.perturbation(named)
        params = [p for _, p in named]
        # w + e goes into fresh tensors and w stays where it is, to be put back by reference: exact (w + e - e
        # can differ in the last bit) and two weight-sized passes cheaper than copying w out and back in.
        originals = [p.data for p in params]
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.data = p.data + e
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with frozen_bn_statistics(model):
                second_ctx = dataclasses.replace(ctx, reuse_attack=True) if self.reuse_attack else ctx
                second_loss, _ = self._forward(model, method, x, y, second_ctx)
                finite = is_finite(second_loss)
                if finite:
                    second_loss.backward()
        finally:
            for p, original in zip(params, originals):
                p.data = original
        return logs, loss, second_loss.detach(), finite

    def __call__(self, model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, ctx) -> dict:
        if self.m is not None and self.m < len(y):
            return self._m_sharpness(model, method, x, y, ctx)
        logs, loss, second_loss, finite = self._perturbed_gradient(model, method, x, y, ctx)
        out = {**loggable(logs, loss), "sam/loss_perturbed": second_loss.float()}
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return {**out, "nonfinite": 1.0}
        out.update(self._clip(model))
        self.optimizer.step()
        method.after_step(model, x)
        return out

    def _m_sharpness(self, model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, ctx) -> dict:
        """Foret et al.'s m-sharpness: each chunk of m images gets its own perturbation e_c and gradient
        ∇L_c(w + e_c) (their code does this per accelerator); the step takes the size-weighted mean of the
        chunks' gradients, clipped, so m = batch size is plain SAM. Logs are size-weighted means too."""
        params = list(model.parameters())
        total: list[torch.Tensor | None] = [None] * len(params)
        weighted: dict = {}
        for xc, yc in zip(x.split(self.m), y.split(self.m)):
            logs, loss, second_loss, finite = self._perturbed_gradient(model, method, xc, yc, ctx)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                return {**loggable(logs, loss), "sam/loss_perturbed": second_loss.float(), "nonfinite": 1.0}
            share = len(yc) / len(y)
            chunk_logs = {**loggable(logs, loss), "sam/loss_perturbed": second_loss.float()}
            for key, value in chunk_logs.items():
                weighted[key] = weighted.get(key, 0.0) + share * value
            with torch.no_grad():
                for i, p in enumerate(params):
                    if p.grad is not None:
                        total[i] = p.grad * share if total[i] is None else total[i].add_(p.grad, alpha=share)
        for p, grad in zip(params, total):
            p.grad = grad
        out = {**weighted, "sam/chunks": float(-(-len(y) // self.m))}
        out.update(self._clip(model))
        self.optimizer.step()
        method.after_step(model, x)
        return out


def sam_rho(cfg) -> float:
    """method.rho, or when it is null the dataset's recipe: dataset.sam_rho, or dataset.asam_rho with
    method.adaptive (their schema defaults, the references' 0.05 and 2.0, when the config carries no
    dataset). `cfg` may be a plain dict, as a results.json config is."""
    method = cfg.get("method") or {}
    if method.get("rho") is not None:
        return float(method.get("rho"))
    key = "asam_rho" if method.get("adaptive", False) else "sam_rho"
    dataset = cfg.get("dataset") or {}
    return float(dataset.get(key, getattr(DatasetConfig, key)))


def describe_update(cfg) -> dict:
    """The update rule with its resolved settings, for results.json's `run.update`."""
    method = cfg.get("method") or {}
    if method.get("sam", False):
        adaptive = bool(method.get("adaptive", False))
        rule = {"rule": "asam" if adaptive else "sam", "rho": sam_rho(cfg), "attack": method.get("sam_attack", "rerun")}
        if adaptive:
            rule.update(eta=float(method.get("asam_eta", 0.0)), scale=method.get("asam_scale", "all"))
        # Images per perturbation: m-sharpness when set, else the whole batch (per process under torchrun).
        rule["m"] = method.get("sam_m") or "batch"
        return rule
    if method.get("awp", False):
        from runner.awp import awp_gamma

        return {"rule": "awp", "gamma": awp_gamma(cfg), "warmup_epochs": int(method.get("awp_warmup", 0))}
    return {"rule": "plain"}


def build_update(cfg, model: nn.Module, optimizer: torch.optim.Optimizer) -> Update:
    method_cfg = cfg.get("method") if hasattr(cfg, "get") else getattr(cfg, "method", None)
    if method_cfg is not None and bool(method_cfg.get("sam", False)):
        return SAMUpdate(cfg, model, optimizer)
    if method_cfg is not None and bool(method_cfg.get("awp", False)):
        from runner.awp import AWPUpdate  # it builds on this module

        return AWPUpdate(cfg, model, optimizer)
    return Update(cfg, model, optimizer)
