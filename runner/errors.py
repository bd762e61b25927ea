"""The failures a user can cause and fix: reported as one line naming the problem, never a traceback."""

from runner.checkpoint import CheckpointError
from runner.data import DatasetUnavailable


class ConfigError(ValueError):
    """A value that composes but cannot be used (negative eps, a model that does not match...)."""


def _nonfinite():
    from runner.train import NonFiniteLoss

    return NonFiniteLoss


KNOWN_ERRORS = (ValueError, DatasetUnavailable, CheckpointError, OSError, _nonfinite())
