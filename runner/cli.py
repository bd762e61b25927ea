"""Thin Hydra entrypoints: compose the config, call one `run`, turn known failures into one clear line.

Full tracebacks stay available behind HYDRA_FULL_ERROR=1.
"""

import hashlib
import os
import re
import sys

import hydra
from omegaconf import OmegaConf

from runner.config import register_configs


def run_name(override_dirname: str) -> str:
    """A run directory name from the command's overrides: the same command, the same directory."""
    name = re.sub(r"[^A-Za-z0-9=,+._\-]", "_", override_dirname.replace("/", "_")) or "default"
    if len(name) > 120:  # long sweeps: keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


if not OmegaConf.has_resolver("rt_run_name"):
    OmegaConf.register_new_resolver("rt_run_name", run_name)
register_configs()


def _report_and_exit(err: BaseException, command: str) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"{command}: error: {err}", file=sys.stderr)
    sys.exit(1)


def _output_dir():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


@hydra.main(config_path="pkg://runner.configs", config_name="train", version_base="1.3")
def train_main(cfg) -> None:
    from runner.errors import KNOWN_ERRORS
    from runner.train import run

    try:
        run(cfg, _output_dir())
    except KNOWN_ERRORS as err:
        _report_and_exit(err, "robust-train")


@hydra.main(config_path="pkg://runner.configs", config_name="eval", version_base="1.3")
def eval_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from runner.errors import KNOWN_ERRORS
    from runner.reevaluate import reevaluate

    try:
        overrides = list(HydraConfig.get().overrides.task)
        reevaluate(cfg, overrides, _output_dir())
    except KNOWN_ERRORS as err:
        _report_and_exit(err, "robust-eval")
