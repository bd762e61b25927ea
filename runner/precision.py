"""Exact fp32 for certification and evaluation on GPUs.

By default torch runs fp32 cuDNN convolutions in TF32 (a 10-bit mantissa) on Ampere and later GPUs, and a
run may also have switched TF32 on for matmuls. A certificate computed in TF32 can be unsound (interval
ends off by ~1e-4 in the unsafe direction) and an "fp32" attack is then not fp32. `exact_fp32()` turns
TF32 off for convolutions, RNNs and matmuls, and cudnn.benchmark off (evaluation calls the model on many
batch sizes: autotuning each shape is slow, and the algorithm it picks can flip near-tie points), then
restores every setting on exit. The flags are process-wide and initialise no device.

Torch >= 2.9 keeps two views of these settings: the legacy one (`torch.backends.cudnn.allow_tf32`,
`torch.set_float32_matmul_precision`) and the per-operator `fp32_precision` strings, and raises when they
disagree: cuBLAS checks the matmul pair on every fp32 matmul, the legacy getters check theirs. Setting only
the per-operator strings would leave them disagreeing (a run that had enabled TF32 through the legacy
switches would then fail on its first GPU matmul), so both views are set, legacy first (its setters rewrite
the strings), then the strings explicitly (an "ieee" string wins over a parent `fp32_precision` of "tf32");
on exit both are put back as they were. Neither setter warns in torch 2.14.
"""

import contextlib

import torch

# How evaluation runs, as results.json's env records it.
EVAL_PRECISION = "fp32: TF32 off for convolutions and matmuls, cudnn.benchmark off"


def _per_operator_switches() -> list:
    """The objects whose `fp32_precision` picks TF32 or IEEE fp32 for one kind of operator (the oneDNN
    matmul is among them because torch.set_float32_matmul_precision rewrites it too)."""
    b = torch.backends
    return [b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul]


def _legacy_settings() -> tuple:
    """(cudnn.allow_tf32, float32 matmul precision); None where torch refuses to read one because the
    caller had already set the two views inconsistently (then only the per-operator strings are restored)."""
    values = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision):
        try:
            values.append(read())
        except RuntimeError:
            values.append(None)
    return tuple(values)


@contextlib.contextmanager
def exact_fp32():
    """IEEE fp32 convolutions and matmuls, and no cuDNN autotuning, inside the block; the previous
    settings back on exit."""
    switches = _per_operator_switches()
    saved_strings = [switch.fp32_precision for switch in switches]
    cudnn_tf32, matmul_precision = _legacy_settings()
    benchmark = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        for switch in switches:
            switch.fp32_precision = "ieee"
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        if matmul_precision is not None:
            torch.set_float32_matmul_precision(matmul_precision)
        for switch, value in zip(switches, saved_strings):
            switch.fp32_precision = value
        torch.backends.cudnn.benchmark = benchmark
