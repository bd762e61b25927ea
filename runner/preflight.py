"""Pre-flight: a command line composed exactly as Hydra will compose it, and checked (`runner.validation`)
before Hydra writes the run directory. The CLI calls `preflight_train` / `preflight_eval` for a single
run and `preflight_sweep` for a `-m` sweep, whose every job is composed and checked before any is launched.
"""

from runner.errors import ConfigError
from runner.validation import check_eval_command, check_run, check_writable_dir


def _compose(overrides: list[str], config_name: str, sweep: bool = False):
    """(the config without its hydra node, the run directory (with `sweep`: the sweep directory), the hydra
    node's sweeper settings, whether that directory is time-stamped: its setting holds ${now:...}, so it
    is a new directory by construction, never one to resume in)."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    from runner.config import register_configs

    register_configs()
    setup_globals()  # ${now:...} in the run directory
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
        from omegaconf import OmegaConf, open_dict

        node = cfg.hydra.sweep if sweep else cfg.hydra.run
        stamped = "${now:" in str(OmegaConf.to_container(node, resolve=False).get("dir"))
        run_dir = node.dir
        sweeper = cfg.hydra.sweeper
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, run_dir, sweeper, stamped


def preflight_train(overrides: list[str], config_name: str = "train") -> None:
    cfg, run_dir, _, _ = _compose(overrides, config_name)
    check_writable_dir(run_dir, "hydra.run.dir")
    check_run(cfg)


def preflight_eval(overrides: list[str], config_name: str = "eval") -> str | None:
    """Checks as `preflight_train`; returns the run directory Hydra would use when it is a time-stamped
    one (the caller reserves it), else None."""
    from runner.reevaluate import prepare

    cfg, run_dir, _, stamped = _compose(overrides, config_name)
    check_eval_command(cfg)
    check_writable_dir(run_dir, "hydra.run.dir")
    prepare(cfg, [o for o in overrides if not o.startswith(("hydra.", "hydra/"))])
    return run_dir if stamped else None


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(overrides: list[str], params: dict | None = None) -> tuple[list[list[str]], set[str]]:
    """The override list of every job a `-m` command line launches with Hydra's basic sweeper (the cartesian
    product of the sweep overrides, `hydra.sweeper.params` first), and the keys the sweep varies."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(arguments)
    swept = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], swept


def preflight_sweep(overrides: list[str], config_name: str = "train") -> str | None:
    """Every job of a `-m` sweep composed and checked as `preflight_train` / `preflight_eval` check a single
    run, before the sweeper writes anything (multirun.yaml included) or launches a job: a bad value in
    any job fails the whole sweep up front, naming the job. Other sweepers than Hydra's basic one are left
    to check their jobs as they start. Returns the sweep directory when it is time-stamped (a new one, for
    the caller to reserve); None when it is not (a sweep to resume names its own) or the jobs were not checked."""
    from omegaconf import OmegaConf

    from runner.errors import describe

    jobs, swept = sweep_jobs(overrides)
    if not jobs:
        return None
    _, first_sweep_dir, sweeper, stamped = _compose(jobs[0], config_name, sweep=True)
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.get("params") else None
    if params:
        jobs, swept = sweep_jobs(overrides, params)
    for number, job in enumerate(jobs, 1):
        try:
            cfg, sweep_dir, _, _ = _compose(job, config_name, sweep=True)
            if number == 1:
                check_writable_dir(sweep_dir, "hydra.sweep.dir")
            if config_name == "eval":
                from runner.reevaluate import prepare

                check_eval_command(cfg)
                prepare(cfg, [o for o in job if not o.startswith(("hydra.", "hydra/"))])
            else:
                check_run(cfg)
        except Exception as err:  # noqa: BLE001 - a bug (no one-line description) keeps its traceback
            message = describe(err)
            if message is None or len(jobs) == 1:
                raise
            varied = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept)
            raise ConfigError(f"sweep job {number} of {len(jobs)} ({varied or 'no swept keys'}): {message}; "
                              f"no job was launched") from None
    return first_sweep_dir if stamped else None
