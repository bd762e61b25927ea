"""Hydra entrypoints `robust-train` and `robust-eval`: compose the config, call one `run`, and turn every
failure the user can fix into one line on stderr and exit status 1.

A single run is checked before Hydra writes anything (`runner.validation.preflight_*`: the command line
composed exactly as Hydra will, values, the run directory, the checkpoint). Hydra's own errors (unknown
option, unknown key, wrong type) and the run's (missing dataset, bad checkpoint, non-finite loss) are
reformatted by `runner.errors.describe`; a failure that is not the user's (a bug) keeps its traceback.
HYDRA_FULL_ERROR=1 keeps Hydra's full tracebacks for everything.

Exit status: 0 done, 1 an error, 128+N stopped by signal N after a checkpoint (143 SIGTERM, 138 SIGUSR1:
a SLURM script can requeue on those), 130 Ctrl-C.
"""

import contextlib
import hashlib
import os
import re
import sys
import traceback

import hydra
from omegaconf import OmegaConf

from runner.config import register_configs


def run_name(override_dirname: str) -> str:
    """A run directory name from the command's overrides: the same command, the same directory.

    `+method=at,seed=0` becomes `method-at+seed-0`: no '=' or ',', so the directory can be passed back
    unquoted as a Hydra value (`robust-eval ckpt=outputs/runs/method-at+seed-0`).
    """
    items = [item.lstrip("+~").replace("=", "-", 1) for item in override_dirname.split(",") if item]
    name = re.sub(r"[^A-Za-z0-9+._\-@]", "_", "+".join(items).replace("/", "_")) or "default"
    if len(name) > 120:  # long sweeps: keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


if not OmegaConf.has_resolver("rt_run_name"):
    OmegaConf.register_new_resolver("rt_run_name", run_name)
register_configs()


def _output_dir():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


# Set by `_main` unless the user asked for HYDRA_FULL_ERROR=1: a single run's task reports its own
# errors (Hydra would otherwise print "Error executing job with overrides" above the one line).
_report_in_task = False


def _single_run_task() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return _report_in_task and HydraConfig.get().mode == RunMode.RUN


@hydra.main(config_path="pkg://runner.configs", config_name="train", version_base="1.3")
def _train_task(cfg) -> None:
    from runner.train import run

    try:
        run(cfg, _output_dir())
    except Exception as err:
        if _single_run_task():
            _exit_for(err, "robust-train")
        raise  # a sweep job: Hydra records it and says which job failed


@hydra.main(config_path="pkg://runner.configs", config_name="eval", version_base="1.3")
def _eval_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from runner.reevaluate import reevaluate

    try:
        reevaluate(cfg, list(HydraConfig.get().overrides.task), _output_dir())
    except Exception as err:
        if _single_run_task():
            _exit_for(err, "robust-eval")
        raise


def train_main() -> None:
    _main(_train_task, "robust-train", "train")


def eval_main() -> None:
    _main(_eval_task, "robust-eval", "eval")


def _single_run_overrides(argv: list[str], default_config: str):
    """(overrides, config name) when argv is a plain single run that the pre-flight can compose as Hydra
    will; None for anything else (--help, --cfg, -m, a config dir...), which goes to Hydra unchecked."""
    from hydra._internal.utils import get_args_parser

    try:
        args, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error: let Hydra print it
        return None
    if unknown or args.help or args.hydra_help or args.info or args.cfg or args.shell_completion:
        return None
    if args.multirun or args.config_path or args.config_dir or args.experimental_rerun or args.resolve:
        return None
    return list(args.overrides), args.config_name or default_config


@contextlib.contextmanager
def _hydra_reraises():
    """Hydra prints a shortened traceback for errors it catches; with HYDRA_FULL_ERROR=1 it re-raises,
    so `_main` can say them in one line instead. Restored afterwards."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def _exit_for(err: BaseException, command: str) -> None:
    """Print one line (or a bug's traceback) for `err` and exit with its status."""
    from runner.errors import RunInterrupted, describe

    if isinstance(err, KeyboardInterrupt):
        print(f"{command}: interrupted (Ctrl-C); run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if isinstance(err, RunInterrupted):
        print(f"{command}: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    message = describe(err)
    if message is None:
        traceback.print_exception(err)
        print(f"{command}: internal error (a bug, not your input): {type(err).__name__}: {err}",
              file=sys.stderr)
    else:
        print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(1)


def _main(task, command: str, config_name: str) -> None:
    global _report_in_task
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        task()  # the user asked for full tracebacks: Hydra re-raises, Python prints them
        return
    _report_in_task = True
    try:
        single = _single_run_overrides(sys.argv[1:], config_name)
        if single is not None:
            from runner import validation

            preflight = validation.preflight_train if command == "robust-train" else validation.preflight_eval
            preflight(*single)
        with _hydra_reraises():
            task()
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every error ends here: one line, or a bug's traceback
        _exit_for(err, command)
