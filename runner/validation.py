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
    _choice("threat.norm", cfg.threat.norm, NORMS)
    check_eps("threat.eps", cfg.threat.norm, cfg.threat.eps, cfg.dataset)


def check_eps(key: str, norm: str, eps, dataset) -> None:
    """One radius in pixel units under `norm` (threat.eps, or an evaluator's own eps)."""
    if isinstance(eps, bool) or not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        _fail(key, eps, "must be a finite number >= 0 (pixel units, images in [0, 1])")
    if norm == "linf" and eps > 1:
        hint = f"; did you mean {eps:g}/255 = {eps / 255:.5g}?" if eps <= 255 else ""
        _fail(key, eps, f"an linf radius is in [0, 1] pixel units (images are in [0, 1]){hint}")
    if norm == "l2":
        from runner.data import INFO, dataset_info

        if dataset.name in INFO or dataset.name == "synthetic":
            info = dataset_info(dataset)
            diameter = math.sqrt(info.channels * info.image_size**2)
            if eps > diameter:
                _fail(key, eps, f"larger than the diameter {diameter:.4g} of the [0, 1] image box")


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
    from runner.data import dataset_info

    if d.name in INFO or d.name == "synthetic":
        size = dataset_info(d).image_size
        if d.augment != "none" and d.crop_padding >= size:
            _fail("dataset.crop_padding", d.crop_padding, f"must be smaller than the image size ({size}) for "
                  f"dataset.augment={d.augment}")
    check_split_sizes(d)


# Training-set sizes of the torchvision datasets (what dataset.val_size is cut from).
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}


def _split_sizes_fail(key: str, value, n: int, k: int, what: str) -> None:
    if value >= n:
        _fail(key, value, f"{what} has only {n} images; it must be smaller")
    if value < k:
        _fail(key, value, f"the split is stratified: it needs at least one image per class ({k} classes)")
    if n - value < k:
        _fail(key, value, f"leaves {n - value} of the {n} images of {what}, fewer than the {k} classes")


def check_split_sizes(d) -> None:
    """dataset.test_size / val_size / n_samples that the data can satisfy, checked on the labels alone
    (the splits are stratified: every class needs members on both sides of each cut)."""
    import numpy as np

    from runner.data import INFO, dataset_info

    if d.name == "synthetic":
        k = d.num_classes
        if d.n_samples < 2 * k:
            _fail("dataset.n_samples", d.n_samples, f"too few for {k} classes: the stratified test and validation "
                  f"splits need at least two images of each class (>= {2 * k}; a few hundred to learn anything)")
        labels = np.arange(d.n_samples) % k
    elif d.name == "digits":
        from sklearn.datasets import load_digits

        labels = load_digits().target
    elif d.name in TRAIN_SIZES:
        k = INFO[d.name].num_classes
        if d.val_size:
            _split_sizes_fail("dataset.val_size", d.val_size, TRAIN_SIZES[d.name], k,
                              f"the training set of {d.name}")
        return
    else:
        return
    k = dataset_info(d).num_classes if d.name != "synthetic" else d.num_classes
    if d.test_size:
        _split_sizes_fail("dataset.test_size", d.test_size, len(labels), k, f"dataset {d.name}")
        from sklearn.model_selection import train_test_split

        try:
            labels, _ = train_test_split(labels, test_size=d.test_size, stratify=labels, random_state=0)
        except ValueError as err:
            _fail("dataset.test_size", d.test_size, f"cannot cut a stratified test split from {d.name}: "
                  f"{' '.join(str(err).split())}")
    if d.val_size:
        if np.bincount(labels, minlength=k).min() < 2:
            _fail("dataset.n_samples" if d.name == "synthetic" else "dataset.test_size",
                  d.n_samples if d.name == "synthetic" else d.test_size,
                  "leaves a class with fewer than two training images: the validation split cannot be cut")
        _split_sizes_fail("dataset.val_size", d.val_size, len(labels), k,
                          f"the training part of {d.name} (after dataset.test_size={d.test_size})")


def check_model_fits_data(cfg) -> None:
    """The model takes the dataset's images: built on the meta device (no memory, no weights), so an image
    too small for its convolutions fails here, in one line, and not after the data is loaded."""
    import torch

    from runner.data import INFO, dataset_info
    from runner.models import build_model

    if cfg.dataset.name not in INFO and cfg.dataset.name != "synthetic":
        return
    info = dataset_info(cfg.dataset)
    try:
        with torch.device("meta"):
            build_model(cfg.model, info)
    except (RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        _fail("model.name", cfg.model.name, f"cannot take the {info.channels}x{info.image_size}x{info.image_size} "
              f"images of dataset.name={cfg.dataset.name!r} ({detail}); use a larger dataset.image_size or "
              f"another model (model=mlp takes any size)")


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
    if not method.get("sam", False):
        for key, default in (("rho", None), ("adaptive", False)):
            if method.get(key, default) != default:
                _fail(f"method.{key}", method.get(key), f"has no effect: SAM is off for method={method.name} "
                      f"(method.sam=false); turn it on with method.sam=true, or use +method=sam")
    for key in ("kappa_start", "kappa_end"):
        if method.get(key) is not None:
            _fraction(f"method.{key}", method.get(key), closed_high=True)
    if "val_batch_size" in method:
        _at_least("method.val_batch_size", method.val_batch_size, 1, "a positive batch size")
    attack = method.get("attack")
    if attack is not None:
        _at_least("method.attack.eps_factor", attack.eps_factor, 0, ">= 0 (the training radius is "
                  "eps_factor x threat.eps)")
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
        check_evaluator_eps(cfg, i, spec)
    from runner.evaluate import build_evaluators

    build_evaluators(cfg)  # unknown evaluators and keys fail now, not after training


def check_validation_split(cfg) -> None:
    """dataset.val_size=0 trains on the whole training set, as TRADES and SAM do, with no per-epoch
    validation and so no best.pt: only a run that evaluates its final model can do without it."""
    if cfg.dataset.val_size > 0:
        return
    from runner.methods import build_method

    which = cfg.eval.checkpoint
    if which == "auto":
        which = build_method(cfg).reported_checkpoint
    if which == "best":
        _fail("dataset.val_size", 0, f"evaluating best.pt (eval.checkpoint={cfg.eval.checkpoint}) needs a validation "
              "split to select it on: keep one (e.g. dataset.val_size=150) or evaluate the final model with "
              "eval.checkpoint=last")


def check_evaluator_eps(cfg, i: int, spec) -> None:
    """An evaluator's own eps (a number, "k/255" or a list) and eps_factors follow threat.eps's rules."""
    from omegaconf import OmegaConf

    from runner.evaluators.pgd import requested_eps

    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    if spec.get("eps") is None and not spec.get("eps_factors"):
        return
    norm = spec.get("norm") or cfg.threat.norm
    if norm not in NORMS:
        return  # the evaluator itself names a bad norm
    try:
        values, factors = requested_eps(spec, spec["name"])
    except ValueError:
        return  # the evaluator's constructor says what is wrong
    key = f"eval.evaluators[{i}].eps"
    for value in values:
        check_eps(key, norm, value, cfg.dataset)
    if norm == cfg.threat.norm:
        for factor in factors:
            check_eps(f"eval.evaluators[{i}].eps_factors ({factor:g} x threat.eps)", norm,
                      factor * cfg.threat.eps, cfg.dataset)


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
    _choice("dataset.name", cfg.dataset.name, sorted(set(INFO) | set(LOADERS)))
    check_threat(cfg)
    _choice("model.name", cfg.model.name, sorted(ARCHITECTURES))
    check_logger(cfg.logger)
    check_eval(cfg)


def check_writable_dir(path, key: str = "hydra.run.dir") -> None:
    """The directory exists and is writable, or can be created: checked without writing anything."""
    if path is None or not str(path).strip():
        _fail(key, "" if path is None else str(path), "must be a directory path (empty would write the run into "
              "the current directory)")
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

def _compose(overrides: list[str], config_name: str, sweep: bool = False):
    """(the config without its hydra node, the run directory; with `sweep`, the sweep directory and the
    hydra node's sweeper settings too)."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals

    from runner.config import register_configs

    register_configs()
    setup_globals()  # ${now:...} in the run directory
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
        run_dir = cfg.hydra.sweep.dir if sweep else cfg.hydra.run.dir
        sweeper = cfg.hydra.sweeper
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        return (cfg, run_dir, sweeper) if sweep else (cfg, run_dir)


def preflight_train(overrides: list[str], config_name: str = "train") -> None:
    cfg, run_dir = _compose(overrides, config_name)
    check_writable_dir(run_dir, "hydra.run.dir")
    check_run(cfg)


def preflight_eval(overrides: list[str], config_name: str = "eval") -> str:
    """Checks as `preflight_train`; returns the run directory Hydra would use."""
    from runner.reevaluate import prepare

    cfg, run_dir = _compose(overrides, config_name)
    check_eval_command(cfg)
    check_writable_dir(run_dir, "hydra.run.dir")
    prepare(cfg, [o for o in overrides if not o.startswith(("hydra.", "hydra/"))])
    return run_dir


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


def preflight_sweep(overrides: list[str], config_name: str = "train") -> None:
    """Every job of a `-m` sweep composed and checked as `preflight_train` / `preflight_eval` check a single
    run, before the sweeper writes anything (multirun.yaml included) or launches a job: a bad value in
    any job fails the whole sweep up front, naming the job. Other sweepers than Hydra's basic one are left
    to check their jobs as they start."""
    from omegaconf import OmegaConf

    from runner.errors import describe

    jobs, swept = sweep_jobs(overrides)
    if not jobs:
        return
    _, _, sweeper = _compose(jobs[0], config_name, sweep=True)
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return
    params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.get("params") else None
    if params:
        jobs, swept = sweep_jobs(overrides, params)
    for number, job in enumerate(jobs, 1):
        try:
            cfg, sweep_dir, _ = _compose(job, config_name, sweep=True)
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
