"""The failures a user can cause and fix, and how each is told: one line naming the key or the file and
what is allowed, never a traceback. `describe(err)` returns that line, or None for an error that is
not the user's (a bug), which keeps its traceback. HYDRA_FULL_ERROR=1 keeps full tracebacks for all.
"""

import dataclasses
import re
import signal
import sys

from runner.checkpoint import CheckpointError
from runner.data import DatasetUnavailable


class ConfigError(ValueError):
    """A value that composes but cannot be used (negative eps, a model that does not match...)."""


class RunInterrupted(Exception):
    """SIGTERM/SIGUSR1 (SLURM pre-emption or time limit): a checkpoint was written, rerun to resume."""

    def __init__(self, signum: int, message: str | None = None):
        if message is None:  # re-made from its text alone: OmegaConf re-raises what interrupts its code so
            message = str(signum)
            named = re.search(r"\bSIG(INT|TERM|USR1|USR2)\b", message)
            signum = getattr(signal, named.group(0)) if named else signal.SIGTERM
        super().__init__(message)
        self.signum = int(signum)


class RunDirBusy(RuntimeError):
    """Another live process holds this run directory (the same command twice, or a sweep collision)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf (train.nonfinite=stop, or more than train.max_skips skipped steps)."""


KNOWN_ERRORS = (ValueError, DatasetUnavailable, CheckpointError, OSError, NonFiniteLoss, RunDirBusy)


# Where torchvision looks for each dataset's files under dataset.data_dir.
DATASET_FILES = {
    "mnist": "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte, uncompressed: gunzip the .gz downloads)",
    "fashion_mnist": "FashionMNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, uncompressed: gunzip the .gz downloads)",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
    "cifar100": "cifar-100-python/ (train, test, meta)",
    "svhn": "train_32x32.mat and test_32x32.mat",
}


def _short_reason(reason: str) -> str:
    """torchvision's multi-line download failure (every mirror tried, every urlopen error) in a few words."""
    text = " ".join(str(reason).split())
    first = _first_line(reason).rstrip(":")
    if "urlopen error" in text or "Name or service not known" in text or "Temporary failure" in text:
        return f"{first} (no network)"
    return first


def dataset_missing_message(name: str, root, reason: str) -> str:
    """One line for a torchvision dataset that is not on disk and could not be downloaded: where its files
    are expected and how to get them there (what runner.data raises)."""
    root = str(root)
    where = f"{root.rstrip('/')}/{DATASET_FILES[name]}" if name in DATASET_FILES else root
    return (
        f"dataset '{name}' was not found under dataset.data_dir={root!r} ({_short_reason(reason)}); it is "
        f"expected in {where}. Download it on a machine with internet (torchvision.datasets, download=True, "
        f"root=<dir>) and copy the files there, or point dataset.data_dir (or $ROBUST_TRAIN_DATA) at a folder "
        f"that has them."
    )


def _checkpoint_error(err, command: str | None) -> str:
    """torch's weights_only advice (re-load with weights_only=False: unsafe, and not the fix) left out; a
    run's own damaged last.pt gets the way to start over."""
    text = str(err)
    if "Weights only load failed" in text:
        text = text[: text.index("Weights only load failed")] + "the file is damaged or was not written by robust-train"
    text = " ".join(text.split())
    if command == "robust-train" and re.search(r"last(\.prev)?\.pt'", text):
        text += ("; no good last.pt or last.prev.pt to resume from: start the run over with resume=never "
                 "(or resume=<another checkpoint>)")
    return text


def _first_line(text) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _user_options(options) -> list[str]:
    """A group's options without the schema nodes Hydra lists next to them."""
    return [o for o in options or [] if not o.startswith("schema")]


def _schema_keys(err) -> list[str] | None:
    cls = getattr(err, "object_type", None)
    if cls is not None and dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    parent = getattr(err, "parent_node", None)
    if parent is not None and hasattr(parent, "keys"):
        return [str(k) for k in parent.keys()]
    return None


def _omegaconf(err, override: str | None = None, command: str | None = None) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigAttributeError | ConfigKeyError):
        keys = _schema_keys(err)
        where = key.rsplit(".", 1)[0] + "." if "." in key else ""
        allowed = f"; allowed keys here: {', '.join(where + k for k in keys)}" if keys else ""
        if not keys and key.startswith("method."):  # `method` is null: plain ERM has no method keys
            allowed = ("; the method's keys are the checkpoint's" if command == "robust-eval" else
                       "; no method is chosen (plain ERM): pick one first, e.g. +method=trades method.beta=6")
        return f"{key}: unknown key{allowed}"
    if isinstance(err, MissingMandatoryValue):
        if key == "ckpt":
            return "ckpt is required: robust-eval ckpt=<run dir or checkpoint .pt> [overrides]"
        return f"{key} must be set (it has no default): add {key}=<value>"
    given = f"{override}: " if override else f"{key}: "
    return f"{given}{_first_line(getattr(err, 'msg', None) or err)}"


def _hydra(err, command: str | None = None) -> str | None:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MissingConfigException):
        missing = err.missing_cfg_file or ""
        if "/" in missing:
            group, option = missing.rsplit("/", 1)
            options = _user_options(err.options)
            available = f"; available: {', '.join(options)}" if options else ""
            return f"{group}={option}: no such option in group '{group}'{available}"
        return _first_line(err)
    if isinstance(err, OverrideParseException):
        detail = [line for line in str(err).splitlines()[1:] if line and not line.startswith("See ")]
        return (f"cannot parse the override {err.override!r}: {'; '.join(detail) or _first_line(err)} "
                f"(overrides are key=value, +key=value to add, ~key to delete; quote a value that holds "
                f"'=', ',' or spaces: \"key='a=b,c'\")")
    if isinstance(err, ConfigCompositionException):
        twice = re.search(r"Multiple values for (\S+)\. To override a value use 'override \S+: (\S+)'", str(err))
        if twice:
            group, option = twice.groups()
            given = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") == group]
            if len(given) > 1:
                return f"{group} is given {len(given)} times on the command line ({', '.join(given)}): keep one"
            return (f"{group} is already chosen by a config (an experiment preset or a method's recipe): "
                    f"replace it with {group}={option} on the command line, without the '+' "
                    f"(+{group}= only adds a group that is not there)")
        cause = err.__cause__
        match = re.search(r"override (\S+=\S*)", str(err))
        override = match.group(1) if match else None
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf(cause, override, command)
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return None


def describe(err: BaseException, command: str | None = None) -> str | None:
    """One line for an error the user can fix; None for anything else (a bug keeps its traceback).
    `command` (robust-train, robust-eval) tailors the hints that depend on it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, HydraException):
        return _hydra(err, command) or _first_line(err)
    if isinstance(err, OmegaConfBaseException):
        return _omegaconf(err, command=command)
    if isinstance(err, RunInterrupted):
        return str(err)
    if isinstance(err, DatasetUnavailable):
        return " ".join(str(err).split())
    if isinstance(err, CheckpointError):
        return _checkpoint_error(err, command)
    if isinstance(err, ConfigError | NonFiniteLoss | RunDirBusy):
        return str(err)
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return (f"out of memory ({_first_line(err)}): lower train.batch_size or eval.batch_size, "
                    f"or use a smaller model")
    except AttributeError:  # torch without OutOfMemoryError
        pass
    if isinstance(err, OSError):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return f"{err.strerror or _first_line(err)}{where}" if err.strerror else _first_line(err)
    if isinstance(err, ValueError):
        return " ".join(str(err).split())
    return None
