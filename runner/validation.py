"""Value checks the structured-config schemas cannot express (ranges, choices, paths), run before a
run writes anything. Each failure is a `ConfigError` whose message names the key, the value given and
what is allowed, so a typo costs seconds, not a queued cluster job.

`check_run(cfg)` checks a composed run config; `check_writable_dir` a directory the run will create;
`preflight_train` / `preflight_eval` compose a command line exactly as Hydra will and check it before
Hydra creates the run directory (the CLI calls them for single runs; sweeps are checked per job).
"""

import math
import os
import re
from pathlib import Path

from runner.errors import ConfigError

NORMS = ("linf", "l2")
AUGMENTS = ("none", "crop", "crop_flip")
LABEL_NOISE_KINDS = ("symmetric", "asymmetric")
PRECISIONS = ("fp32", "bf16")
NONFINITE_POLICIES = ("stop", "skip")
PROGRESS_MODES = ("auto", "rich", "plain")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "multistep", "onecycle")
EVAL_CHECKPOINTS = ("auto", "best", "last")
LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
BN_MODES = ("eval", "train")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _fail(key: str, value, problem: str) -> None:
    raise ConfigError(f"{key}={value!r}: {problem}")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        _fail(key, value, f"not a known value; allowed: {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low, what: str = "") -> None:
    if value is None or not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
        _fail(key, value, f"must be {what or f'>= {low}'}")


def _positive(key: str, value) -> None:
    if value is None or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        _fail(key, value, "must be a positive number")


def _fraction(key: str, value, closed_high: bool = False) -> None:
    ok = isinstance(value, int | float) and 0 <= value and (value <= 1 if closed_high else value < 1)
    if not ok:
        _fail(key, value, f"must be in [0, 1{']' if closed_high else ')'}")


def check_device(name: str) -> None:
    if not DEVICE_PATTERN.match(str(name)):
        _fail("device", name, "not a known device; allowed: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail("device", name, "CUDA is not available on this machine; use device=auto or device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            _fail("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_threat(cfg) -> None:
    """threat.eps is in [0, 1] pixel units; an L2 ball is bounded by the diameter of the image box."""
    norm, eps = cfg.threat.norm, cfg.threat.eps
    _choice("threat.norm", norm, NORMS)
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        _fail("threat.eps", eps, "must be a finite number >= 0 (pixel units, images in [0, 1])")
    if norm == "linf" and eps > 1:
        hint = f"; did you mean {eps:g}/255 = {eps / 255:.5g}?" if eps <= 255 else ""
        _fail("threat.eps", eps, f"an linf radius is in [0, 1] pixel units (images are in [0, 1]){hint}")
    if norm == "l2":
        from runner.data import INFO, dataset_info

        if cfg.dataset.name in INFO or cfg.dataset.name == "synthetic":
            info = dataset_info(cfg.dataset)
            diameter = math.sqrt(info.channels * info.image_size**2)
            if eps > diameter:
                _fail("threat.eps", eps, f"larger than the diameter {diameter:.4g} of the [0, 1] image box")


def check_dataset(d) -> None:
    from runner.data import INFO, LOADERS

    _choice("dataset.name", d.name, sorted(set(INFO) | set(LOADERS)))
    if not str(d.data_dir).strip():
        _fail("dataset.data_dir", d.data_dir, "must be a directory path")
    _at_least("dataset.val_size", d.val_size, 0)
    if not (isinstance(d.train_fraction, int | float) and 0 < d.train_fraction <= 1):
        _fail("dataset.train_fraction", d.train_fraction, "must be in (0, 1]")
    _at_least("dataset.test_size", d.test_size, 0)
    _choice("dataset.augment", d.augment, AUGMENTS)
    _at_least("dataset.crop_padding", d.crop_padding, 0)
    _fraction("dataset.label_noise", d.label_noise)
    _choice("dataset.label_noise_kind", d.label_noise_kind, LABEL_NOISE_KINDS)
    if d.name == "synthetic":
        _at_least("dataset.n_samples", d.n_samples, 1)
        _at_least("dataset.num_classes", d.num_classes, 2)
        _at_least("dataset.channels", d.channels, 1)
        _at_least("dataset.image_size", d.image_size, 1)


def check_model(m) -> None:
    from runner.models import ARCHITECTURES

    _choice("model.name", m.name, sorted(ARCHITECTURES))
    _at_least("model.width", m.width, 1)
    _at_least("model.depth", m.depth, 0)
    for i, width in enumerate(m.hidden):
        _at_least(f"model.hidden[{i}]", width, 1)


def check_train(t) -> None:
    _at_least("train.epochs", t.epochs, 1, "a positive number of epochs")
    _at_least("train.batch_size", t.batch_size, 1, "a positive batch size")
    if t.grad_clip is not None:
        _positive("train.grad_clip", t.grad_clip)
    _at_least("train.log_every", t.log_every, 1)
    _at_least("train.val_every", t.val_every, 1)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    _at_least("train.max_skips", t.max_skips, 0)
    _choice("train.progress", t.progress, PROGRESS_MODES)
    if t.collapse_drop is not None:
        _fraction("train.collapse_drop", t.collapse_drop)


def check_optimization(o, s) -> None:
    _choice("optimizer.name", o.name, OPTIMIZERS)
    _positive("optimizer.lr", o.lr)
    _fraction("optimizer.momentum", o.momentum)
    _at_least("optimizer.weight_decay", o.weight_decay, 0)
    if len(o.betas) != 2:
        _fail("optimizer.betas", list(o.betas), "must be two numbers in [0, 1)")
    for i, beta in enumerate(o.betas):
        _fraction(f"optimizer.betas[{i}]", beta)
    _choice("scheduler.name", s.name, SCHEDULERS)
    _at_least("scheduler.warmup_epochs", s.warmup_epochs, 0)
    for i, milestone in enumerate(s.milestones):
        _fraction(f"scheduler.milestones[{i}]", milestone, closed_high=True)
    _positive("scheduler.gamma", s.gamma)
    _fraction("scheduler.pct_start", s.pct_start)
    _at_least("scheduler.final_lr_ratio", s.final_lr_ratio, 0)


def check_method(cfg) -> None:
    """Generic keys here; each method's own keys are checked by its constructor (built, not run)."""
    method = cfg.get("method")
    if method is None:
        return
    if method.get("rho") is not None:
        _positive("method.rho", method.rho)
    attack = method.get("attack")
    if attack is not None:
        _at_least("method.attack.steps", attack.steps, 0)
        _at_least("method.attack.restarts", attack.restarts, 1)
        if attack.alpha is not None:
            _positive("method.attack.alpha", attack.alpha)
        _choice("method.attack.bn_mode", attack.bn_mode, BN_MODES)
    from runner.methods import build_method

    build_method(cfg)


def check_eval(cfg) -> None:
    e = cfg.eval
    if e.n_examples is not None:
        _at_least("eval.n_examples", e.n_examples, 1, "a positive number or null (the whole test split)")
    _at_least("eval.batch_size", e.batch_size, 1)
    _choice("eval.checkpoint", e.checkpoint, EVAL_CHECKPOINTS)
    for i, spec in enumerate(e.evaluators):
        if not hasattr(spec, "get") or not spec.get("name"):
            _fail(f"eval.evaluators[{i}]", spec, "each evaluator is a mapping with a name, e.g. {name: pgd}")
    from runner.evaluate import build_evaluators

    build_evaluators(cfg)  # unknown evaluators and keys fail now, not after training


def check_logger(lg) -> None:
    _choice("logger.name", lg.name, LOGGERS)
    _choice("logger.mode", lg.mode, LOGGER_MODES)


def check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    if not Path(resume).expanduser().exists():
        _fail("resume", resume, "no such file; allowed: auto, never, or the path of a checkpoint (.pt)")


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
        _fail("seed", cfg.seed, "must be in [0, 2**63)")
    check_device(cfg.device)
    check_resume(cfg.resume)
    check_dataset(cfg.dataset)
    check_threat(cfg)
    check_model(cfg.model)
    check_train(cfg.train)
    check_optimization(cfg.optimizer, cfg.scheduler)
    check_logger(cfg.logger)
    check_method(cfg)
    check_eval(cfg)


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
    _choice("dataset.name", cfg.dataset.name, sorted(set(INFO) | set(LOADERS)))
    check_threat(cfg)
    _choice("model.name", cfg.model.name, sorted(ARCHITECTURES))
    check_logger(cfg.logger)
    check_eval(cfg)


def check_writable_dir(path, key: str = "hydra.run.dir") -> None:
    """The directory exists and is writable, or can be created: checked without writing anything."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link cannot be created through
            _fail(key, str(path), f"{str(probe)!r} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        _fail(key, str(path), f"cannot create a directory there: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(key, str(path), f"{str(probe)!r} is not writable (permissions or a read-only file system); "
                              f"set {key}=<a writable directory>")


def _config_error(err: Exception) -> ConfigError:
    from runner.errors import describe

    return ConfigError(describe(err) or f"{type(err).__name__}: {err}")


# ---- pre-flight: the command line as Hydra will compose it, before Hydra writes the run directory ----

def _compose(overrides: list[str], config_name: str):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    from runner.config import register_configs

    register_configs()
    setup_globals()  # ${now:...} in the run directory
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
        run_dir = cfg.hydra.run.dir
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, run_dir


def preflight_train(overrides: list[str], config_name: str = "train") -> None:
    cfg, run_dir = _compose(overrides, config_name)
    check_writable_dir(run_dir, "hydra.run.dir")
    check_run(cfg)


def preflight_eval(overrides: list[str], config_name: str = "eval") -> None:
    from runner.reevaluate import prepare

    cfg, run_dir = _compose(overrides, config_name)
    check_eval_command(cfg)
    check_writable_dir(run_dir, "hydra.run.dir")
    prepare(cfg, [o for o in overrides if not o.startswith(("hydra.", "hydra/"))])
