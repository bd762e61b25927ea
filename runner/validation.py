"""Value checks the structured-config schemas cannot express (ranges, choices, paths), run before a
run writes anything. Each failure is a `ConfigError` whose message names the key, the value given and
what is allowed, so a typo costs seconds, not a queued cluster job.

`check_run(cfg)` checks a composed run config, `check_eval_command` / `check_eval_run` an evaluation;
`check_writable_dir` a directory the run will create. The checks of each config group are in
`runner.validation_groups` (the dataset's in `runner.validation_data`); `runner.preflight` composes a
command line exactly as Hydra will and runs these checks before Hydra creates the run directory.
"""

import os
import re
from pathlib import Path

from runner.errors import ConfigError
from runner.validation_data import check_dataset, check_model_fits_data
from runner.validation_groups import (
    check_eval,
    check_logger,
    check_method,
    check_model,
    check_optimization,
    check_threat,
    check_train,
    check_validation_split,
    fail,
    one_of,
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: str) -> None:
    if not DEVICE_PATTERN.match(str(name)):
        fail("device", name, "not a known device; allowed: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("device", name, "CUDA is not available on this machine; use device=auto or device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            fail("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    if not Path(resume).expanduser().exists():
        fail("resume", resume, "no such file; allowed: auto, never, or the path of a checkpoint (.pt)")


def check_known_keys(node, prefix: str = "") -> None:
    """`+key=value` can add keys a schema does not have (a typo like +train.epoch=5 would be ignored)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in allowed:
                raise ConfigError(f"{prefix}{key}: unknown key; allowed keys here: "
                                  f"{', '.join(prefix + k for k in allowed)}")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, f"{prefix}{key}.")


def check_run(cfg) -> None:
    """Everything a training run reads, checked before it writes anything."""
    from omegaconf import OmegaConf

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # noqa: BLE001 - reported by errors.describe with the key named
        raise _config_error(err) from None
    check_known_keys(cfg)
    if not (0 <= cfg.seed < 2**63):
        fail("seed", cfg.seed, "must be in [0, 2**63)")
    check_device(cfg.device)
    check_resume(cfg.resume)
    check_dataset(cfg.dataset)
    check_threat(cfg)
    check_model(cfg.model)
    check_model_fits_data(cfg)
    check_train(cfg.train)
    check_optimization(cfg.optimizer, cfg.scheduler)
    check_logger(cfg.logger)
    check_method(cfg)
    check_eval(cfg)
    check_validation_split(cfg)


def check_eval_command(cfg) -> None:
    """robust-eval's own keys, before the checkpoint is read."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ConfigError("ckpt is required: robust-eval ckpt=<run dir or checkpoint .pt> [overrides]")
    check_known_keys(cfg)
    check_device(cfg.device)
    check_logger(cfg.logger)


def check_eval_run(cfg) -> None:
    """The checkpoint's config merged with the command line: what an evaluation reads. Lenient about
    keys a checkpoint written by an older version may lack (it is not a schema-typed config)."""
    from runner.data import INFO, LOADERS
    from runner.models import ARCHITECTURES

    check_device(cfg.device)
    one_of("dataset.name", cfg.dataset.name, sorted(set(INFO) | set(LOADERS)))
    check_threat(cfg)
    one_of("model.name", cfg.model.name, sorted(ARCHITECTURES))
    check_logger(cfg.logger)
    check_eval(cfg)


def check_writable_dir(path, key: str = "hydra.run.dir") -> None:
    """The directory exists and is writable, or can be created: checked without writing anything."""
    if path is None or not str(path).strip():
        fail(key, "" if path is None else str(path), "must be a directory path (empty would write the run into "
              "the current directory)")
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link cannot be created through
            fail(key, str(path), f"{str(probe)!r} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        fail(key, str(path), f"cannot create a directory there: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(key, str(path), f"{str(probe)!r} is not writable (permissions or a read-only file system); "
                              f"set {key}=<a writable directory>")


def _config_error(err: Exception) -> ConfigError:
    from runner.errors import describe

    return ConfigError(describe(err) or f"{type(err).__name__}: {err}")
