"""Hydra entrypoints `robust-train` and `robust-eval`: compose the config, call one `run`, and turn every
failure the user can fix into one line on stderr and exit status 1.

A single run is checked before Hydra writes anything (`runner.preflight.preflight_*`: the command line
composed exactly as Hydra will, values, the run directory, the checkpoint). Hydra's own errors (unknown
option, unknown key, wrong type) and the run's (missing dataset, bad checkpoint, non-finite loss) are
reformatted by `runner.errors.describe`; a failure that is not the user's (a bug) keeps its traceback.
HYDRA_FULL_ERROR=1 keeps Hydra's full tracebacks for everything.

A plain `robust-train --help` (nothing else on the line) is answered from the configs directory without
importing torch or Hydra: the groups and their options, the common keys, examples. With overrides
(`robust-train +method=at --help`) it is Hydra's help, which composes the config and prints it.

Exit status: 0 done, 1 an error, 128+N stopped by signal N after a checkpoint (143 SIGTERM, 138 SIGUSR1:
a SLURM script can requeue on those), 130 Ctrl-C.
"""

import contextlib
import hashlib
import os
import re
import signal
import sys
import textwrap
import traceback
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMMANDS = {"robust-train": "train", "robust-eval": "eval"}


def _interrupted_while_starting(_signum, _frame) -> None:
    """Ctrl-C while the console script imports torch and Hydra (the first second): one line, exit 130."""
    command = os.path.basename(sys.argv[0]) if sys.argv else "robust-train"
    print(f"{command}: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


# Installed before the heavy imports below, only when this module is imported by a console script;
# `_main` puts Python's own handler back once it can report Ctrl-C itself.
if sys.argv and os.path.basename(sys.argv[0]) in COMMANDS and signal.getsignal(signal.SIGINT) is (
    signal.default_int_handler
):
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def _trained_lines(task_overrides, exclude_keys) -> list[str]:
    """The command's overrides that can change what is trained, sorted as Hydra's override_dirname lists
    them: the keys train.yaml's exclude_keys names and every `eval.*` key (they change only the
    evaluation) left out. Parsed, not split on ',': values such as evaluator lists hold commas."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    excluded = set(exclude_keys or ())
    parsed = OverridesParser.create().parse_overrides(list(task_overrides or ()))
    return sorted(o.input_line for o in parsed
                  if o.key_or_group not in excluded and not o.key_or_group.startswith("eval."))


def _directory_name(lines: list[str]) -> str:
    items = [item.lstrip("+~").replace("=", "-", 1) for item in ",".join(lines).split(",") if item]
    name = re.sub(r"[^A-Za-z0-9+._\-@]", "_", "+".join(items).replace("/", "_")) or "default"
    if len(name) > 120:  # long sweeps: keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def run_name(task_overrides, exclude_keys=()) -> str:
    """A run directory name from the command's overrides: the same training, the same directory.

    `+method=at seed=0` becomes `method-at+seed-0`: no '=' or ',', so the directory can be passed back
    unquoted as a Hydra value (`robust-eval ckpt=outputs/runs/method-at+seed-0`).
    """
    return _directory_name(_trained_lines(task_overrides, exclude_keys))


def sweep_name(task_overrides, exclude_keys, sweep_dir: str) -> str:
    """A sweep job's subdirectory: its run name, plus every key the sweep varies that the run name leaves
    out. `robust-train -m eval=quick,full` then gives each suite its own directory, instead of two jobs
    training into one (at once, under a parallel launcher). The sweep's own overrides come from the
    multirun.yaml the sweeper writes before launching; without it, the run name alone."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    try:
        sweep_overrides = OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task
        swept = {o.get_key_element() for o in parser.parse_overrides(list(sweep_overrides)) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - no readable multirun.yaml: name the job as a single run
        swept = set()
    named = _trained_lines(task_overrides, exclude_keys)
    job = parser.parse_overrides(list(task_overrides))
    extra = [o.input_line for o in job if o.get_key_element() in swept and o.input_line not in named]
    return _directory_name(sorted(named + extra))


def _plain_help(argv: list[str]) -> str | None:
    """The command when argv is exactly `robust-train --help` (or robust-eval, or -h), else None."""
    command = os.path.basename(argv[0]) if argv else ""
    return command if command in COMMANDS and argv[1:] in (["--help"], ["-h"]) else None


def _register() -> None:
    """The run-name resolver and every schema (Hydra's ConfigStore): what composing a config needs."""
    from omegaconf import OmegaConf

    from runner.config import register_configs

    if not OmegaConf.has_resolver("rt_run_name"):
        OmegaConf.register_new_resolver("rt_run_name", run_name)
    if not OmegaConf.has_resolver("rt_sweep_name"):
        OmegaConf.register_new_resolver("rt_sweep_name", sweep_name)
    register_configs()


# Importing this module registers them (tests compose through Hydra after `import runner.cli`), except
# for a plain `--help`, which is answered from the configs directory alone (`_help_text`): no torch,
# no Hydra, no composition.
if _plain_help(sys.argv) is None:
    _register()


# ---- the fast --help ---------------------------------------------------------------------------------

# Groups a checkpoint's evaluation takes from the checkpoint (training only).
EVAL_SKIPS = ("method", "experiment", "optimizer", "scheduler", "dataset", "model")  # the checkpoint's
GROUP_NOTES = {
    "method": "none given: plain ERM; pick one with +method=NAME",
    "experiment": "presets of the papers' recipes, experiment=NAME",
    "hydra/launcher": "sweep launchers for -m, besides Hydra's basic, joblib and submitit_*",
}

EXAMPLES = {
    "robust-train": [
        ("robust-train", "ERM on digits (offline), evaluated with the quick suite"),
        ("robust-train +method=at", "PGD adversarial training"),
        ("robust-train +method=trades method.beta=6", "TRADES"),
        ("robust-train +method=ibp", "IBP certified training (its recipe), then certificates"),
        ("robust-train experiment=cifar10_at", "a preset"),
        ("robust-train threat.norm=l2 threat.eps=0.5", "the threat model, eps in [0,1] pixel units"),
        ("robust-train -m +method=erm,at seed=0,1 hydra/launcher=joblib", "a local parallel sweep"),
        ("robust-train +method=at --cfg job", "print the composed config and exit"),
        ("robust-train +method=at --help", "Hydra's help: the groups and the composed config"),
    ],
    "robust-eval": [
        ("robust-eval ckpt=outputs/runs/method-at", "the quick suite on a run's checkpoint"),
        ("robust-eval ckpt=outputs/runs/method-at eval=full", "any suite on any checkpoint"),
        ("robust-eval ckpt=model.pt eval=certified threat.eps=0.05", "other settings"),
        ("robust-eval ckpt=outputs/runs/method-at --cfg job", "print the command's own config (before the "
         "checkpoint's)"),
    ],
}

KEYS_HELP = {
    "robust-train": [
        "Keys (key=value): seed, deterministic, device=auto|cpu|cuda, resume=auto|never, threat.norm=linf|l2,",
        "  threat.eps (pixel units), train.epochs, train.batch_size, train.precision=fp32|bf16,",
        "  dataset.data_dir, dataset.label_noise, eval.n_examples, method.<key> of the chosen method.",
    ],
    "robust-eval": [
        "Keys (key=value): device=auto|cpu|cuda, threat.norm=linf|l2, threat.eps (pixel units), eval.n_examples,",
        "  eval.batch_size, eval.seed, dataset.data_dir. The training keys (method, model, dataset, train.*,",
        "  seed) are the checkpoint's and cannot be overridden.",
    ],
}

SUMMARY = {
    "robust-train": "compose the config, train, evaluate with the selected suite, write the run directory\n"
    "(.hydra/, train.log, metrics.jsonl, checkpoints/last.pt, results.json, status.json).",
    "robust-eval": "evaluate an existing checkpoint with any suite; results.json lands in a new run "
    "directory.\nThe model, dataset, method and training settings come from the checkpoint; so does the "
    "threat, unless overridden.",
}


def _config_defaults(config_name: str) -> dict[str, str]:
    """{group: default option} from the primary config's defaults list (its `group: option` entries)."""
    import yaml

    entries = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text())["defaults"]
    return {
        group: option
        for entry in entries
        if isinstance(entry, dict)
        for group, option in entry.items()
        if not group.startswith("override ")
    }


def _options(group: Path) -> list[str]:
    return sorted(path.stem for path in group.glob("*.yaml"))


def _help_text(command: str) -> str:
    """Usage, the config groups with their options (default marked), the keys most runs set, examples."""
    config_name = COMMANDS[command]
    defaults = _config_defaults(config_name)
    groups = {p.name: _options(p) for p in sorted(CONFIG_DIR.iterdir()) if p.is_dir() and _options(p)}
    groups.update({f"hydra/{p.name}": _options(p) for p in sorted((CONFIG_DIR / "hydra").glob("*"))})
    groups.pop("hydra", None)
    for name in EVAL_SKIPS if command == "robust-eval" else ():
        groups.pop(name, None)
    usage = "ckpt=<run dir or .pt> [group=option ...] [key=value ...]" if command == "robust-eval" else (
        "[group=option ...] [+method=NAME] [key=value ...]"
    )
    lines = [
        f"{command}: {SUMMARY[command]}",
        "",
        f"Usage: {command} {usage}",
        f"       {command} -m key=a,b ...   (a Hydra multirun sweep, one job per combination)",
        "",
        "Config groups (group=option; * marks the default):",
    ]
    width = max(len(name) for name in groups) + 2
    for name, options in groups.items():
        listed = [f"{o}*" if defaults.get(name) == o else o for o in options]
        if name in GROUP_NOTES:
            listed[-1] += f"  ({GROUP_NOTES[name]})"
        wrapped = textwrap.wrap(", ".join(listed), 110 - width - 2, break_on_hyphens=False)
        lines.append(f"  {name:<{width}}{wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    lines += ["", *KEYS_HELP[command], f"  `{command} --cfg job` prints every key of the composed config.", "",
              "Examples:"]
    width = max(len(example) for example, _ in EXAMPLES[command]) + 3
    lines += [f"  {example:<{width}}# {what}" for example, what in EXAMPLES[command]]
    lines += ["", "Hydra's own options (--cfg, --resolve, --multirun, --info, ...): --hydra-help", ""]
    return "\n".join(lines)


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


class SweepStopped(BaseException):
    """A stop signal in a job of an in-process sweep: the jobs after it must not start (Hydra's basic
    launcher records an Exception as a failed job and goes on; a BaseException ends the sweep)."""

    def __init__(self, interrupted):
        super().__init__(str(interrupted))
        self.interrupted = interrupted


def _in_process_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", ""))


def _train(cfg) -> None:
    from runner.errors import RunInterrupted
    from runner.train import run

    try:
        run(cfg, _output_dir())
    except Exception as err:
        if _single_run_task():
            _exit_for(err, "robust-train")
        if isinstance(err, RunInterrupted) and _in_process_sweep():
            raise SweepStopped(err) from None
        raise  # a sweep job: Hydra records it and says which job failed


def _eval(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from runner.reevaluate import reevaluate

    try:
        reevaluate(cfg, list(HydraConfig.get().overrides.task), _output_dir())
    except Exception as err:
        if _single_run_task():
            _exit_for(err, "robust-eval")
        raise


def _hydra_task(function, config_name: str):
    """`function` as a Hydra application (Hydra imported only when a command composes a config)."""
    import hydra

    return hydra.main(config_path="pkg://runner.configs", config_name=config_name, version_base="1.3")(function)


def _train_task() -> None:
    _hydra_task(_train, "train")()


def _eval_task() -> None:
    _hydra_task(_eval, "eval")()


def train_main() -> None:
    _main(_train_task, "robust-train", "train")


def eval_main() -> None:
    _main(_eval_task, "robust-eval", "eval")


def _single_run_overrides(argv: list[str], default_config: str, multirun: bool = False):
    """(overrides, config name) when argv is a plain single run (with `multirun`: a plain `-m` sweep) that
    the pre-flight can compose as Hydra will; None for anything else (--help, --cfg, a config dir...),
    which goes to Hydra unchecked."""
    from hydra._internal.utils import get_args_parser

    try:
        args, unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error: let Hydra print it
        return None
    if unknown or args.help or args.hydra_help or args.info or args.cfg or args.shell_completion:
        return None
    if bool(args.multirun) != multirun:
        return None
    if args.config_path or args.config_dir or args.experimental_rerun or args.resolve:
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
    from runner.tracking import NOT_RESUMABLE, RESUME_HINT

    if isinstance(err, KeyboardInterrupt):
        again = RESUME_HINT if command == "robust-train" else NOT_RESUMABLE
        print(f"{command}: interrupted (Ctrl-C); {again}", file=sys.stderr)
        sys.exit(130)
    if isinstance(err, SweepStopped):
        print(f"{command}: {err.interrupted}; the sweep stops here (its later jobs were not started): run the "
              "same command with its hydra.sweep.dir to resume", file=sys.stderr)
        sys.exit(128 + err.interrupted.signum)
    if isinstance(err, RunInterrupted):
        print(f"{command}: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    message = describe(err, command)
    if message is None:
        traceback.print_exception(err)
        print(f"{command}: internal error (a bug, not your input): {type(err).__name__}: {err}",
              file=sys.stderr)
    else:
        print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(1)


def _own_directory(key: str, path) -> None:
    """A time-stamped directory (outputs/evals/<second>, outputs/sweeps/<second>) reserved: two evaluations
    (or sweeps) started in the same second get one each. A named directory (a sweep to resume) is never
    stamped, so never reserved; `path` is None then."""
    if path is not None:
        from runner.tracking import reserve_run_dir

        sys.argv.append(f"{key}={reserve_run_dir(path)}")


def _main(task, command: str, config_name: str) -> None:
    global _report_in_task
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, `_exit_for` reports it
    if _plain_help([command, *sys.argv[1:]]):
        print(_help_text(command))
        return
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        task()  # the user asked for full tracebacks: Hydra re-raises, Python prints them
        return
    _report_in_task = True
    try:
        single = _single_run_overrides(sys.argv[1:], config_name)
        if single is not None:
            from runner.preflight import preflight_eval, preflight_train

            preflight = preflight_train if command == "robust-train" else preflight_eval
            run_dir = preflight(*single)
            if command == "robust-eval":
                _own_directory("hydra.run.dir", run_dir)
        sweep = _single_run_overrides(sys.argv[1:], config_name, multirun=True)
        if sweep is not None:  # every job checked before the sweeper writes or launches anything
            from runner.preflight import preflight_sweep

            sweep_dir = preflight_sweep(*sweep)
            _own_directory("hydra.sweep.dir", sweep_dir)
        with _hydra_reraises():
            task()
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every error ends here: one line, or a bug's traceback
        _exit_for(err, command)
