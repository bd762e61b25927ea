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


