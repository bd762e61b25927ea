"""The first convolution's CPU input-gradient kernel: the same function and gradients as nn.Conv2d."""

import pytest
import torch
from torch import nn

from runner import layers
from runner.config import compose
from runner.data import dataset_info
from runner.models import build_model


def _pair(bias: bool, stride: int, padding: int, kernel: int = 3, channels: int = 3):
    torch.manual_seed(0)
    plain = nn.Conv2d(channels, 5, kernel, stride, padding, bias=bias)
    few = layers.conv2d(channels, 5, kernel, stride, padding, bias=bias)
    few.load_state_dict(plain.state_dict())
    assert type(few) is layers.FewChannelConv2d
    return plain, few


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 4), (1, 0, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_few_channel_conv_gradients_are_conv2ds(bias, stride, padding, kernel, channels_last):
    plain, few = _pair(bias, stride, padding, kernel)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 9, 9, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(plain(x).shape, generator=g)
    results = []
    for layer in (plain, few):
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        params = [p for p in layer.parameters()]
        results.append((out.detach(), *torch.autograd.grad(out, [inputs, *params], grad)))
    assert torch.equal(results[0][0], results[1][0])  # the same forward kernel
    for ours, expected in zip(results[1][1:], results[0][1:], strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_few_channel_conv_takes_its_own_backward_only_where_it_helps():
    """The custom node only where an input gradient is asked for on a CPU in float32 without autocast."""
    _, few = _pair(True, 1, 1)
    x = torch.rand(2, 3, 6, 6)
    assert type(few(x).grad_fn).__name__ == "ConvolutionBackward0"  # a training step: weight gradient only
    assert type(few(x.requires_grad_()).grad_fn).__name__ == "_FewChannelConvBackward"
    assert type(few.double()(x.double()).grad_fn).__name__ == "ConvolutionBackward0"
    few.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert few(x).dtype == torch.bfloat16
    assert torch.autograd.gradcheck(
        layers._FewChannelConv.apply, (torch.rand(2, 2, 5, 5, dtype=torch.float64, requires_grad=True),
                                      torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True),
                                      torch.randn(3, dtype=torch.float64, requires_grad=True), (2, 2), (1, 1))
    )


@pytest.mark.parametrize("model,expected", [("cnn_digits", 1), ("cnn_small", 1), ("preact_resnet18", 1)])
def test_models_use_it_for_the_image_layer_only(model, expected):
    cfg = compose(["dataset=synthetic", f"model={model}"])
    net = build_model(cfg.model, dataset_info(cfg.dataset))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    few = [m for m in convs if isinstance(m, layers.FewChannelConv2d)]
    assert len(few) == expected and few[0] is convs[0] and convs[0].in_channels <= layers.FEW_CHANNELS


def test_an_input_gradient_alone_skips_the_weight_gradient():
    """An attack's autograd.grad(loss, x) computes no weight gradient, as the built-in convolution's
    backward skips it; backward() and a gradient asked for the weight still get theirs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightGradients(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                WeightGradients.count += 1
            return func(*args, **(kwargs or {}))

    _, few = _pair(True, 1, 1)
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    with WeightGradients():
        loss = few(x * 2).square().sum()
        torch.autograd.grad(loss, x, retain_graph=True)
        assert WeightGradients.count == 0
        (grad_weight,) = torch.autograd.grad(loss, few.weight, retain_graph=True)
        assert WeightGradients.count == 1
        loss.backward()
        assert WeightGradients.count == 2
    torch.testing.assert_close(grad_weight, few.weight.grad)
