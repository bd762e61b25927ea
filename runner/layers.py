"""Building blocks every model is made of, and that the bounds module knows how to propagate.

Models are nn.Sequential stacks of standard torch layers plus the modules below, so that
attacks, interval bounds and CROWN all walk the same, explicit structure.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# An image's first convolution sees at most this many channels (RGB + 1). Measured on a 2-core Xeon
# (one thread, float32): oneDNN's input gradient of such a convolution is 2-7x slower than ATen's im2col
# kernel (cnn_small's first layer, batch 128: 3.8 ms against 2.0; a 3x3 RGB stem with 64 filters: 31 ms
# against 4.4; cnn_digits' first layer: 0.29 ms against 0.07), while from 8 channels on they are even.
FEW_CHANNELS = 4


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as the model's first layer: inputs stay in [0, 1] pixel units."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """out = main(x) + shortcut(x); `shortcut` is nn.Identity when shapes already agree."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


def conv2d(in_channels: int, out_channels: int, *args, **kwargs) -> nn.Conv2d:
    """nn.Conv2d, or FewChannelConv2d (the same parameters and results) over at most FEW_CHANNELS inputs."""
    cls = FewChannelConv2d if in_channels <= FEW_CHANNELS else nn.Conv2d
    return cls(in_channels, out_channels, *args, **kwargs)


class FewChannelConv2d(nn.Conv2d):
    """An nn.Conv2d whose input gradient on a CPU takes ATen's im2col kernel instead of oneDNN's, which is
    several times slower over few channels (see FEW_CHANNELS). Every attack step computes that gradient
    through the first layer; training steps (whose input needs no gradient), other devices, other dtypes
    and autocast go through nn.Conv2d unchanged."""

    def forward(self, x):
        if (
            x.requires_grad
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self.groups == 1
            and self.dilation == (1, 1)
        ):
            return _FewChannelConv.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


class _FewChannelConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (stride, padding), bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        need_x, need_weight, need_bias = (_engine_needs(ctx, i) for i in range(3))
        grad_x = grad_weight = grad_bias = None
        if need_x:
            kernel = weight.shape[2:]
            mask = (True, False, False)
            grad_x = torch.ops.aten._slow_conv2d_backward.output_mask(grad, x, weight, kernel, stride, padding, mask)[0]
        if need_weight or need_bias:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            mask = (False, need_weight, need_bias and ctx.has_bias)
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, stride, padding, (1, 1), False, (0, 0), 1, mask
            )
        return grad_x, grad_weight, grad_bias, None, None


def _engine_needs(ctx, index: int) -> bool:
    """Whether this backward pass wants the gradient of input `index`. needs_input_grad only says it
    requires one: an attack's autograd.grad(loss, x) leaves the weights' gradients out, and the built-in
    convolution skips them there; so does this node (torch.utils.checkpoint asks the engine the same way)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    try:
        return node is None or torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # a leaf autograd.grad asks for: the engine refuses to say
        return True
