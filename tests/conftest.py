import os

import pytest

# Tests run on a loaded 2-core machine next to other jobs; one thread per test process keeps them steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def compose_cfg():
    """Compose the real `robust-train` config through Hydra's compose API, as the CLI would."""
    from runner.config import compose

    def _compose(*overrides, config_name="train"):
        return compose(list(overrides), config_name=config_name)

    return _compose




def pytest_collection_modifyitems(config, items):
    """`-m gpu` on a machine without CUDA skips the GPU tests (with the reason) instead of failing them."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
