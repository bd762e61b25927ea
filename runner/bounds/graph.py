"""What the bounds can walk: a model flattened into a list of layers, the per-channel affine maps of
Normalize and BatchNorm, and the BatchNorm statistics of a clean batch (Shi et al. training).

Every bound in this package treats BatchNorm as a fixed per-channel affine map z -> s*z + t. In eval
mode s and t come from the running statistics; in train mode they must come from the statistics of the
clean batch (`forward_with_bn_stats`), the ones the clean forward pass normalised with, so that the
clean logits lie inside the bounds of the same step.
"""

import torch
from torch import nn

from runner.layers import Normalize, Residual

LINEAR = (nn.Linear, nn.Conv2d)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)
CHANNEL_AFFINE = (Normalize, *BATCH_NORM)
POOLING = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# Layers a feed-forward CROWN backward pass knows how to transpose.
FEED_FORWARD = (*LINEAR, *CHANNEL_AFFINE, *POOLING, nn.ReLU, nn.Flatten, nn.Identity)
METHODS = ("ibp", "crown_ibp", "crown")


class UnsupportedModel(ValueError):
    """The bounds cannot handle this model (a layer type, a layer option, or a residual for CROWN)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel (`.module`) and torch.compile
    (`._orig_mod`) wrappers, which share its parameters, so bounds run under torchrun and compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def flatten_layers(model: nn.Module) -> list[nn.Module]:
    """Nested nn.Sequential stacks unrolled into one list (DDP and compile wrappers unwrapped first);
    Residual blocks stay single entries."""
    model = unwrap(model)
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in flatten_layers(child)]
    return [model]


def _layer_problem(layer: nn.Module, feed_forward: bool) -> str:
    """Why `layer` cannot be bounded ('' when it can)."""
    name = type(layer).__name__
    if isinstance(layer, Residual):
        if feed_forward:
            return "CROWN here is feed-forward only and the model has a Residual block"
        for branch in (layer.main, layer.shortcut):
            for inner in flatten_layers(branch):
                problem = _layer_problem(inner, feed_forward)
                if problem:
                    return problem
        return ""
    if not isinstance(layer, FEED_FORWARD):
        return f"no bound rule for layer {name}"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"Conv2d with padding_mode={layer.padding_mode!r} (only 'zeros')"
    if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, str) and layer.padding != "valid":
        return f"Conv2d with padding={layer.padding!r} (give the padding as numbers)"
    if isinstance(layer, BATCH_NORM) and not layer.training and layer.running_mean is None:
        return f"{name} without running statistics normalises each batch on its own at test time"
    return ""


def layer_problem(model: nn.Module, method: str) -> str:
    """The first layer `method` cannot propagate through ('' when there is none)."""
    if method not in METHODS:
        raise ValueError(f"bound method must be one of {METHODS}, got {method!r}")
    for layer in flatten_layers(model):
        problem = _layer_problem(layer, feed_forward=method != "ibp")
        if problem:
            return f"{method}: {problem}"
    return ""


def supports(model: nn.Module, method: str = "ibp") -> tuple[bool, str]:
    """Whether `method` (ibp | crown_ibp | crown) can bound `model`'s margins, and why not."""
    problem = layer_problem(model, method)
    if not problem and not isinstance(flatten_layers(model)[-1], nn.Linear):
        problem = f"{method}: the last layer must be nn.Linear (the margin specification is folded into it)"
    return not problem, problem


def check_supported(model: nn.Module, method: str) -> list[nn.Module]:
    ok, reason = supports(model, method)
    if not ok:
        raise UnsupportedModel(reason)
    return flatten_layers(model)


def channel_view(vector: torch.Tensor, ndim: int, leading: int = 1) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against a tensor with `leading` batch-like dims."""
    return vector.view(*([1] * leading), -1, *([1] * (ndim - leading - 1)))


def channel_affine(layer: nn.Module, bn_stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel such that layer(z) = scale*z + shift."""
    if isinstance(layer, Normalize):
        scale = 1.0 / layer.std.flatten()
        return scale, -layer.mean.flatten() * scale
    if bn_stats is not None and layer in bn_stats:
        mean, var = bn_stats[layer]
    elif not layer.training and layer.running_mean is not None:
        mean, var = layer.running_mean, layer.running_var
    else:
        raise UnsupportedModel(
            f"{type(layer).__name__} is in train mode: bound it with the clean batch's statistics "
            "(runner.bounds.forward_with_bn_stats) or put the model in eval mode"
        )
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    return scale, shift


def uses_batch_statistics(model: nn.Module) -> bool:
    """True when some BatchNorm of the model normalises with the batch's statistics (train mode, or no
    running statistics): its bounds then need the clean batch's, from `forward_with_bn_stats`."""
    return any(
        isinstance(m, BATCH_NORM) and (m.training or m.running_mean is None) for m in model.modules()
    )


def forward_with_bn_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Clean forward pass that also returns {BatchNorm module: (batch mean, biased batch var)} for every
    BatchNorm that normalised with batch statistics. The statistics stay in the autograd graph, as in
    the BatchNorm forward itself, so bounds built from them are differentiated the same way."""
    stats, hooks = {}, []

    def capture(module, inputs, _output):
        if module.training or module.running_mean is None:
            z = inputs[0]
            dims = [0] + list(range(2, z.dim()))
            stats[module] = (z.mean(dims), z.var(dims, unbiased=False))

    for module in model.modules():
        if isinstance(module, BATCH_NORM):
            hooks.append(module.register_forward_hook(capture))
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, stats
