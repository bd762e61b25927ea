import itertools
import os
import re

import pytest

# Tests run on a loaded 2-core machine next to other jobs; one thread per test process keeps them steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def selects_gpu_tests(markexpr: str) -> bool:
    """Whether a `-m` expression selects tests *because* they are marked gpu: some choice of the other marks
    it names makes it true with `gpu` and false without ("gpu", "slow and gpu"; not "not gpu", nor "")."""
    from _pytest.mark.expression import Expression  # what pytest's own -m evaluates with

    if not markexpr.strip():
        return False
    expression = Expression.compile(markexpr)
    others = sorted(set(re.findall(r"[\w.:+\-\[\]]+", markexpr)) - {"and", "or", "not", "gpu"})

    def selected(marks) -> bool:
        return expression.evaluate(lambda name, /, **kwargs: name in marks)

    for chosen in itertools.product([False, True], repeat=len(others)):
        marks = {name for name, on in zip(others, chosen) if on}
        if selected(marks | {"gpu"}) and not selected(marks):
            return True
    return False


def pytest_configure(config):
    """CPU runs (the default `-m 'not gpu'`) hide the GPUs before anything initialises CUDA: with device=auto
    a test would otherwise train on a GPU, compare CUDA tensors with CPU-loaded checkpoints, and meet
    cuDNN's nondeterminism in bit-exact checks. Subprocesses (torchrun tests) inherit the hiding."""
    if not selects_gpu_tests(config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture
def compose_cfg():
    """Compose the real `robust-train` config through Hydra's compose API, as the CLI would."""
    from runner.config import compose

    def _compose(*overrides, config_name="train"):
        return compose(list(overrides), config_name=config_name)

    return _compose




@pytest.fixture
def wrap_method_loss():
    """`install(monkeypatch, wrapper)`: the method the training loop builds computes its loss as
    `wrapper(n, loss, *args, **kwargs)`, n the 1-based call (to signal or spike on a chosen call). The
    monkeypatch is a parameter so a test can undo it mid-way with `monkeypatch.context()`."""

    def install(monkeypatch, wrapper):
        import runner.train

        build, calls = runner.train.build_method, {"n": 0}

        def build_wrapped(cfg):
            method = build(cfg)
            loss = method.loss

            def wrapped(*args, **kwargs):
                calls["n"] += 1
                return wrapper(calls["n"], loss, *args, **kwargs)

            method.loss = wrapped
            return method

        monkeypatch.setattr(runner.train, "build_method", build_wrapped)

    return install


@pytest.fixture
def signal_on_call():
    """`make(at_call, signum)`: a loss wrapper for `wrap_method_loss` that sends `signum` to this process on
    the loss's `at_call`-th call (mid-epoch)."""
    import signal

    def make(at_call: int, signum: signal.Signals):
        def signalling(n, loss, *args, **kwargs):
            if n == at_call:
                os.kill(os.getpid(), signum)
            return loss(*args, **kwargs)

        return signalling

    return make


def pytest_collection_modifyitems(config, items):
    """`-m gpu` on a machine without CUDA skips the GPU tests (with the reason) instead of failing them."""
    import torch

    if torch.cuda.is_available():
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not selects_gpu_tests(config.option.markexpr or "")
    no_cuda = pytest.mark.skip(reason="needs CUDA (hidden unless -m selects gpu tests)" if hidden
                               else "needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
