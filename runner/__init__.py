"""robust-train: a command-line experiment runner for robust deep learning.

Python API (the contract): `load_model(path)` and `load_dataset(name, split="test")`.
"""

__version__ = "0.1.0"


def load_model(path):
    """A trained model from a run directory or a checkpoint alone: eval mode, on CPU, inputs in [0, 1]."""
    from omegaconf import OmegaConf

    from runner import checkpoint
    from runner.data import dataset_info
    from runner.models import build_model
    from runner.reevaluate import resolve_checkpoint

    state = checkpoint.load(resolve_checkpoint(path))
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg.model, dataset_info(cfg.dataset))
    model.load_state_dict(state["model"])
    return model.eval()


def load_dataset(name: str, split: str = "test", **overrides):
    """(x, y): x float in [0, 1], N×C×H×W; the test split is fixed, independent of any seed."""
    from runner.data import load_dataset as _load

    return _load(name, split, **overrides)
