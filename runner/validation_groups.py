"""The value checks of each config group a run reads (threat, model, train, optimizer and scheduler, method,
eval, logger), and the small rules they are written with: each failure is a `ConfigError` whose message
names the key, the value given and what is allowed. `runner.validation.check_run` calls them in order;
the dataset group's checks, which need the data's sizes, are in `runner.validation_data`.
"""

import math

from runner.errors import ConfigError

NORMS = ("linf", "l2")
PRECISIONS = ("fp32", "bf16")
NONFINITE_POLICIES = ("stop", "skip")
PROGRESS_MODES = ("auto", "rich", "plain")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "multistep", "onecycle")
EVAL_CHECKPOINTS = ("auto", "best", "last")
LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
BN_MODES = ("eval", "train")


# The rules every check below (and in runner.validation_data / runner.validation) is written with.
def fail(key: str, value, problem: str) -> None:
    raise ConfigError(f"{key}={value!r}: {problem}")
SAM_ATTACKS = ("rerun", "reuse")  # method.sam_attack
ASAM_SCALES = ("all", "weights")  # method.asam_scale


def one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        fail(key, value, f"not a known value; allowed: {', '.join(map(str, allowed))}")


def at_least(key: str, value, low, what: str = "") -> None:
    if value is None or not (isinstance(value, int | float) and math.isfinite(value) and value >= low):
        fail(key, value, f"must be {what or f'>= {low}'}")


def positive(key: str, value) -> None:
    if value is None or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        fail(key, value, "must be a positive number")


def fraction(key: str, value, closed_high: bool = False) -> None:
    ok = isinstance(value, int | float) and 0 <= value and (value <= 1 if closed_high else value < 1)
    if not ok:
        fail(key, value, f"must be in [0, 1{']' if closed_high else ')'}")


def check_threat(cfg) -> None:
    """threat.eps is in [0, 1] pixel units; an L2 ball is bounded by the diameter of the image box."""
    one_of("threat.norm", cfg.threat.norm, NORMS)
    check_eps("threat.eps", cfg.threat.norm, cfg.threat.eps, cfg.dataset)


def check_eps(key: str, norm: str, eps, dataset) -> None:
    """One radius in pixel units under `norm` (threat.eps, or an evaluator's own eps)."""
    if isinstance(eps, bool) or not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        fail(key, eps, "must be a finite number >= 0 (pixel units, images in [0, 1])")
    if norm == "linf" and eps > 1:
        hint = f"; did you mean {eps:g}/255 = {eps / 255:.5g}?" if eps <= 255 else ""
        fail(key, eps, f"an linf radius is in [0, 1] pixel units (images are in [0, 1]){hint}")
    if norm == "l2":
        from runner.data import INFO, dataset_info

        if dataset.name in INFO or dataset.name == "synthetic":
            info = dataset_info(dataset)
            diameter = math.sqrt(info.channels * info.image_size**2)
            if eps > diameter:
                fail(key, eps, f"larger than the diameter {diameter:.4g} of the [0, 1] image box")


def check_model(m) -> None:
    from runner.models import ARCHITECTURES

    one_of("model.name", m.name, sorted(ARCHITECTURES))
    at_least("model.width", m.width, 1)
    at_least("model.depth", m.depth, 0)
    for i, width in enumerate(m.hidden):
        at_least(f"model.hidden[{i}]", width, 1)


def check_train(t) -> None:
    at_least("train.epochs", t.epochs, 1, "a positive number of epochs")
    at_least("train.batch_size", t.batch_size, 1, "a positive batch size")
    if t.grad_clip is not None:
        positive("train.grad_clip", t.grad_clip)
    at_least("train.log_every", t.log_every, 1)
    at_least("train.val_every", t.val_every, 1)
    one_of("train.precision", t.precision, PRECISIONS)
    one_of("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    at_least("train.max_skips", t.max_skips, 0)
    one_of("train.progress", t.progress, PROGRESS_MODES)
    if t.collapse_drop is not None:
        fraction("train.collapse_drop", t.collapse_drop)


def check_optimization(o, s) -> None:
    one_of("optimizer.name", o.name, OPTIMIZERS)
    positive("optimizer.lr", o.lr)
    fraction("optimizer.momentum", o.momentum)
    at_least("optimizer.weight_decay", o.weight_decay, 0)
    if len(o.betas) != 2:
        fail("optimizer.betas", list(o.betas), "must be two numbers in [0, 1)")
    for i, beta in enumerate(o.betas):
        fraction(f"optimizer.betas[{i}]", beta)
    one_of("scheduler.name", s.name, SCHEDULERS)
    at_least("scheduler.warmup_epochs", s.warmup_epochs, 0)
    for i, milestone in enumerate(s.milestones):
        fraction(f"scheduler.milestones[{i}]", milestone, closed_high=True)
    positive("scheduler.gamma", s.gamma)
    fraction("scheduler.pct_start", s.pct_start)
    at_least("scheduler.final_lr_ratio", s.final_lr_ratio, 0)
    cycle = s.get("cycle_momentum")
    if cycle is not None:
        if o.name != "sgd":
            fail("scheduler.cycle_momentum", list(cycle), f"moves SGD's momentum; optimizer.name={o.name!r} has none")
        if len(cycle) != 2 or not all(isinstance(m, int | float) and 0 <= m < 1 for m in cycle) or cycle[0] > cycle[1]:
            fail("scheduler.cycle_momentum", list(cycle), "must be [low, high] with 0 <= low <= high < 1")


def check_method(cfg) -> None:
    """Generic keys here; each method's own keys are checked by its constructor (built, not run)."""
    method = cfg.get("method")
    if method is None:
        return
    if method.get("rho") is not None:
        positive("method.rho", method.rho)
    one_of("method.sam_attack", method.get("sam_attack", "rerun"), SAM_ATTACKS)
    if method.get("sam_m") is not None:
        at_least("method.sam_m", method.sam_m, 1, ">= 1 (images per SAM perturbation; null: the whole batch)")
    one_of("method.asam_scale", method.get("asam_scale", "all"), ASAM_SCALES)
    at_least("method.asam_eta", method.get("asam_eta", 0.0), 0)
    if not (method.get("sam", False) and method.get("adaptive", False)):
        for key, default in (("asam_scale", "all"), ("asam_eta", 0.0)):
            if method.get(key, default) != default:
                fail(f"method.{key}", method.get(key), "has no effect: it shapes ASAM's perturbation; turn ASAM "
                     "on with method.adaptive=true (and method.sam=true, or +method=sam)")
    if not method.get("sam", False):
        for key, default in (("rho", None), ("adaptive", False), ("sam_attack", "rerun"), ("sam_m", None)):
            if method.get(key, default) != default:
                fail(f"method.{key}", method.get(key), f"has no effect: SAM is off for method={method.name} "
                      f"(method.sam=false); turn it on with method.sam=true, or use +method=sam")
    if method.get("awp", False):
        if method.get("sam", False):
            fail("method.awp", True, "cannot be combined with method.sam=true: both perturb the weights before "
                 "the step (SAM in one global rho-ball, AWP layer by layer); pick one")
        if method.get("awp_gamma") is not None:
            positive("method.awp_gamma", method.awp_gamma)
        at_least("method.awp_warmup", method.get("awp_warmup", 0), 0, ">= 0 (epochs of plain updates first)")
    else:
        for key, default in (("awp_gamma", None), ("awp_warmup", 0)):
            if method.get(key, default) != default:
                fail(f"method.{key}", method.get(key), f"has no effect: AWP is off for method={method.name} "
                      f"(method.awp=false); turn it on with method.awp=true")
    attack = method.get("attack")
    if attack is not None:
        at_least("method.attack.eps_factor", attack.eps_factor, 0, ">= 0 (the training radius is "
                  "eps_factor x threat.eps)")
        at_least("method.attack.steps", attack.steps, 1, ">= 1 (no attack steps is plain training: +method=erm, or "
                 "method.attack.eps_factor=0 for HR without evasion)")
        at_least("method.attack.restarts", attack.restarts, 1)
        if attack.alpha is not None:
            positive("method.attack.alpha", attack.alpha)
        one_of("method.attack.bn_mode", attack.bn_mode, BN_MODES)
    from runner.methods import build_method

    try:
        build_method(cfg)
    except ValueError as err:  # a constructor's check, e.g. "method.kappa_start must be in [0, 1], got 1.5"
        raise ConfigError(str(err)) from None


def check_eval(cfg) -> None:
    e = cfg.eval
    if e.n_examples is not None:
        at_least("eval.n_examples", e.n_examples, 1, "a positive number or null (the whole test split)")
    at_least("eval.batch_size", e.batch_size, 1)
    one_of("eval.checkpoint", e.checkpoint, EVAL_CHECKPOINTS)
    for i, spec in enumerate(e.evaluators):
        if not hasattr(spec, "get") or not spec.get("name"):
            fail(f"eval.evaluators[{i}]", spec, "each evaluator is a mapping with a name, e.g. {name: pgd}")
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
        fail("dataset.val_size", 0, f"evaluating best.pt (eval.checkpoint={cfg.eval.checkpoint}) needs a validation "
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
    one_of("logger.name", lg.name, LOGGERS)
    one_of("logger.mode", lg.mode, LOGGER_MODES)
