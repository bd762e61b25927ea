"""The bounds see through DDP and torch.compile wrappers, and the hand-written interval-ReLU backward
matches autograd's."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from runner import bounds
from runner.bounds import fused
from runner.bounds import ibp as ibp_module
from runner.bounds.ibp import _IntervalLinear, _IntervalReLU
from runner.layers import Normalize, Residual


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 1, 6, 6, generator=g), torch.randint(0, 4, (5,), generator=g)


class CompiledLike(nn.Module):
    """What torch.compile returns (an OptimizedModule): the network under `_orig_mod`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


@pytest.fixture
def process_group(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _same_bounds_as_bare(wrapped: nn.Module, bare: nn.Module) -> None:
    x, y = _batch()
    assert bounds.flatten_layers(wrapped) == bounds.flatten_layers(bare)
    assert bounds.supports(wrapped, "ibp")[0]
    expected = bounds.ibp_margin_bounds(bare, x, y, 0.05)
    assert torch.equal(bounds.ibp_margin_bounds(wrapped, x, y, 0.05), expected)
    crown = bounds.margin_lower_bounds(wrapped, x, y, 0.05, method="crown")
    assert torch.equal(crown, bounds.margin_lower_bounds(bare, x, y, 0.05, method="crown"))
    lower, upper = bounds.interval_bounds(wrapped, x, 0.05)
    bare_lower, bare_upper = bounds.interval_bounds(bare, x, 0.05)
    assert torch.equal(lower, bare_lower) and torch.equal(upper, bare_upper)


def test_compile_wrapper_is_unwrapped():
    net = _net().eval()
    _same_bounds_as_bare(CompiledLike(net), net)


def test_real_torch_compile_wrapper_is_unwrapped():
    net = _net().eval()
    compiled = torch.compile(net)  # wrapping only: nothing is compiled until it is called
    assert bounds.flatten_layers(compiled) == bounds.flatten_layers(net)


def test_ddp_wrapper_is_unwrapped(process_group):
    net = _net().eval()
    ddp = nn.parallel.DistributedDataParallel(net)
    _same_bounds_as_bare(ddp, net)
    _same_bounds_as_bare(CompiledLike(ddp), net)


def test_gradients_reach_the_wrapped_weights(process_group):
    net = _net().train()
    ddp = nn.parallel.DistributedDataParallel(net)
    x, y = _batch()
    bounds.robust_cross_entropy(bounds.ibp_margin_bounds(ddp, x, y, 0.05), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on a CPU: the fused loops
def test_interval_relu_backward_matches_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(4, 3, 5, 5, dtype=dtype, generator=g)
    radius = torch.rand(4, 3, 5, 5, dtype=dtype, generator=g)
    centre[0, 0, 0, :3] = torch.tensor([0.5, -0.5, 0.0])  # ends exactly at 0: the masks' ties
    radius[0, 0, 0, :3] = torch.tensor([0.5, 0.5, 0.0])
    grad_centre = torch.randn(centre.shape, dtype=dtype, generator=g)
    grad_radius = torch.randn(centre.shape, dtype=dtype, generator=g)

    def reference(c, r):
        upper, lower = (c + r).relu(), (c - r).relu()
        return upper + lower, upper - lower

    results = []
    for fn in (reference, _IntervalReLU.apply):
        c, r = centre.clone().requires_grad_(), radius.clone().requires_grad_()
        out_c, out_r = fn(c, r)
        torch.autograd.backward([out_c, out_r], [grad_centre, grad_radius])
        results.append((out_c.detach(), out_r.detach(), c.grad, r.grad))
    for ours, expected in zip(results[1], results[0], strict=True):
        assert torch.equal(ours, expected)
    if dtype == torch.float32:
        return
    # Away from the kinks (random points hit none) the backward is the derivative.
    c = torch.randn(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.rand(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(_IntervalReLU.apply, (c, r))


def test_fused_interval_relu_is_bitwise_the_aten_path(monkeypatch):
    """The numba loops (float32 on a CPU) and the ATen formulation give the same bits, forward and
    backward, also on non-contiguous inputs and on the no-grad path certification uses."""
    assert fused._kernels() is not None, "numba is a dependency: the fused path must be available"
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(6, 4, 7, 7, generator=g).transpose(1, 3)  # non-contiguous
    radius = torch.rand(6, 4, 7, 7, generator=g).transpose(1, 3) * 0.5
    centre[0, 0, 0, :2], radius[0, 0, 0, :2] = torch.tensor([0.25, -0.25]), 0.25  # ends exactly at 0
    grads = torch.randn(2, *centre.shape, generator=g)

    def run():
        c, r = centre.clone().requires_grad_(), radius.clone().requires_grad_()
        out_c, out_r = _IntervalReLU.apply(c, r)
        torch.autograd.backward([out_c, out_r], list(grads))
        with torch.no_grad():
            step = ibp_module._scaled_step(nn.ReLU(), centre, radius, 1.0, None)
        return out_c.detach(), out_r.detach(), c.grad, r.grad, *step[:2]

    fused_results = run()
    monkeypatch.setattr(fused, "available", lambda t: False)
    for ours, aten in zip(fused_results, run(), strict=True):
        assert torch.equal(ours, aten)


@pytest.mark.parametrize("eps", [0.0, 8 / 255, 0.1, 0.7])
def test_fused_normalised_box_is_bitwise_the_aten_path(eps, monkeypatch):
    """The one-pass input box (clamped at both ends, through the input normalisation) gives the bits of
    the ATen formulation, on a batch with NaN, pixels at 0 and 1 and beyond; and the bounds of a
    whole network agree with the ATen path's (up to the elided head's summation order)."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 3, 8, 8, generator=g)
    x[0, 0, 0, :6] = torch.tensor([0.0, 1.0, float("nan"), eps, 1.9, -0.9])  # out of range: both clamps
    normalize = Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    net = nn.Sequential(normalize, nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    y = torch.arange(5)

    def run():
        c, r, scale, normalised = ibp_module._input_interval(x, eps, "linf", normalize, None)
        assert normalised and scale == 2.0
        return c, r, bounds.ibp_margin_bounds(net, x[1:], y[1:], eps)

    original, calls = fused.normalised_box, []

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(fused, "normalised_box", counted)
    fused_results = run()
    assert calls, "the one-pass box was not used"
    monkeypatch.setattr(fused, "available", lambda t: False)
    aten_results = run()
    for ours, aten in zip(fused_results[:2], aten_results[:2], strict=True):
        torch.testing.assert_close(ours, aten, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused_results[2], aten_results[2], rtol=1e-6, atol=1e-6)
    assert fused_results[0][0, 0, 0, 2].isnan()
    monkeypatch.undo()
    channels_last = x.to(memory_format=torch.channels_last)  # keeps its format (the ATen path)
    assert ibp_module._input_interval(channels_last, eps, "linf", normalize, None)[0].is_contiguous(
        memory_format=torch.channels_last)


def test_interval_linear_gradients_are_autograds():
    """The one-node Linear rule: float64 gradcheck (the ATen path) and float32 against autograd's
    |W| formulation (the fused path), zero weights included (sgn 0: no gradient through |W|)."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32):
        c = torch.randn(4, 6, dtype=dtype, generator=g).requires_grad_()
        r = torch.rand(4, 6, dtype=dtype, generator=g).requires_grad_()
        weight = torch.randn(3, 6, dtype=dtype, generator=g)
        weight[0, :2] = 0.0
        weight.requires_grad_()
        bias = torch.randn(3, dtype=dtype, generator=g).requires_grad_()
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(_IntervalLinear.apply, (c, r, weight, bias))
            continue
        grads = torch.randn(2, 4, 3, generator=g)
        ours = torch.autograd.grad(_IntervalLinear.apply(c, r, weight, bias), (c, r, weight, bias), list(grads))
        reference = (torch.nn.functional.linear(c, weight, bias), torch.nn.functional.linear(r, weight.abs()))
        expected = torch.autograd.grad(reference, (c, r, weight, bias), list(grads))
        for a, b in zip(ours, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_elided_margins_are_the_specification_times_the_last_layer():
    g = torch.Generator().manual_seed(6)
    last = nn.Linear(7, 4).double()
    c, r = torch.randn(5, 7, dtype=torch.float64, generator=g), torch.rand(5, 7, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 3, 1, 3, 2])
    ours = ibp_module.elided_margin_bounds(last, 4 * c, 4 * r, 0.25, y)  # carried at scale 4
    spec = bounds.margin_spec(y, 4, torch.float64)
    folded = spec @ last.weight
    expected = (folded @ c.unsqueeze(-1)).squeeze(-1) + spec @ last.bias - (folded.abs() @ r.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, expected)
    assert torch.equal(ours.gather(1, y[:, None]), torch.zeros(5, 1, dtype=torch.float64))


def test_fused_interval_relu_overwriting_its_inputs_gives_the_same_bits():
    """After a Linear or Conv2d the fused ReLU writes its results over the layer's fresh output, and
    before one its backward writes over the fresh gradients it is handed: the same bits, forward and
    backward, as the loops that write fresh tensors."""
    g = torch.Generator().manual_seed(7)
    centre, radius = torch.randn(6, 4, 7, 7, generator=g), torch.rand(6, 4, 7, 7, generator=g) * 0.5
    centre[0, 0, 0, :2], radius[0, 0, 0, :2] = torch.tensor([0.25, -0.25]), 0.25  # ends exactly at 0
    grads = torch.randn(2, *centre.shape, generator=g)

    def run(overwrite: bool):
        c, r = centre.clone().requires_grad_(), radius.clone().requires_grad_()
        layer_c, layer_r = c * 1.0, r * 1.0  # a layer's fresh outputs
        out_c, out_r = _IntervalReLU.apply(layer_c, layer_r, overwrite, overwrite)
        assert (out_c.data_ptr() == layer_c.data_ptr()) == overwrite
        handed = [grad.clone() for grad in grads]  # a next layer's fresh gradients
        torch.autograd.backward([out_c, out_r], handed)
        assert torch.equal(handed[0], grads[0]) != overwrite
        with torch.no_grad():
            step = ibp_module._scaled_step(nn.ReLU(), centre.clone(), radius.clone(), 1.0, None, overwrite)
        return out_c.detach(), out_r.detach(), c.grad, r.grad, *step[:2]

    for ours, fresh in zip(run(True), run(False), strict=True):
        assert torch.equal(ours, fresh)


def test_only_a_fresh_layer_output_is_overwritten(monkeypatch):
    """A ReLU overwrites its input only right after a Linear or Conv2d: not at the head of a residual
    branch (the block's input also feeds the shortcut), nor when the regulariser keeps its inputs; and
    its gradients only right before one (through a Flatten at most): not before a residual block, whose
    sum hands one gradient to both branches. The bounds and their gradients are those of the ATen path,
    which never overwrites."""
    torch.manual_seed(0)
    net = nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        Residual(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(108, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )
    x, y = _batch()
    forward, backward, overwrites, owned = fused.relu_forward, fused.relu_backward, [], []

    def spy_forward(c, r, overwrite=False):
        overwrites.append(overwrite)
        return forward(c, r, overwrite)

    def spy_backward(grad_centre, grad_radius, active, overwrite=False):
        owned.append(overwrite)
        return backward(grad_centre, grad_radius, active, overwrite)

    monkeypatch.setattr(fused, "relu_forward", spy_forward)
    monkeypatch.setattr(fused, "relu_backward", spy_backward)

    def bounds_and_gradients(relu_inputs=None):
        net.zero_grad()
        margins = bounds.ibp_margin_bounds(net, x, y, 0.05, relu_inputs=relu_inputs)
        bounds.robust_cross_entropy(margins, y).backward()
        return margins.detach(), [p.grad.clone() for p in net.parameters()]

    ours, gradients = bounds_and_gradients()
    assert overwrites == [True, False, False, True]
    assert owned == [False, True, True, False][::-1]  # the backward visits the ReLUs last to first
    overwrites.clear()
    relu_inputs = []
    kept, _ = bounds_and_gradients(relu_inputs)
    assert overwrites == [False] * 4 and torch.equal(kept, ours)
    monkeypatch.setattr(fused, "available", lambda t: False)
    aten_inputs = []
    aten, aten_gradients = bounds_and_gradients(aten_inputs)
    torch.testing.assert_close(aten, ours)
    for a, b in zip(aten_gradients, gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (c, r), (aten_c, aten_r) in zip(relu_inputs, aten_inputs, strict=True):
        assert torch.equal(c, aten_c) and torch.equal(r, aten_r)


def test_fused_elided_radius_matches_the_broadcast_formulation(monkeypatch):
    """The elided head's one-loop radius and its gradients against the ATen broadcast product (float32;
    the summation orders differ), with tied weights (sgn 0: no gradient through |W_y - W_j|) and every
    class as a label."""
    g = torch.Generator().manual_seed(8)
    last = nn.Linear(30, 5)
    with torch.no_grad():
        last.weight[3, :10] = last.weight[1, :10]  # |W_1 - W_3| is 0 there
    c, r = torch.randn(12, 30, generator=g), torch.rand(12, 30, generator=g)
    y = torch.arange(12) % 5
    grad = torch.randn(12, 5, generator=g)

    def run():
        cc, rr = (c * 4).requires_grad_(), (r * 4).requires_grad_()  # carried at scale 4
        margins = ibp_module.elided_margin_bounds(last, cc, rr, 0.25, y)
        return margins.detach(), *torch.autograd.grad(margins, (cc, rr, last.weight, last.bias), grad)

    original, calls = fused.elided_radius_backward, []
    monkeypatch.setattr(fused, "elided_radius_backward", lambda *args: calls.append(1) or original(*args))
    fused_results = run()
    assert calls, "the fused loops were not used"
    monkeypatch.setattr(fused, "available", lambda t: False)
    for ours, aten in zip(fused_results, run(), strict=True):
        torch.testing.assert_close(ours, aten, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused_results[0].gather(1, y[:, None]), torch.zeros(12, 1))
