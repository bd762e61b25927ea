"""The header of report.md: the block that names the trained model (training seed, recipe, epochs,
checkpoint, software) and says how it was evaluated (threat, suite, examples, checks, interval methods).
Also `threat_summary`, the threat section of results.json that the header reads.
"""

import math
import re
import time
from pathlib import Path

from runner.methods import method_name
from runner.report_tables import evaluator_of
from runner.report_values import eps_255_text, number, path_text, value_text


def threat_summary(norm: str, eps) -> dict:
    """results.json's threat: eps in [0,1] pixel units; eps_255 (the L-inf convention) for linf only."""
    eps = float(eps)
    return {"norm": norm, "eps": eps, "eps_255": round(eps * 255, 3) if norm == "linf" else None}


def eps_text(norm: str | None, eps) -> str:
    if eps is None:
        return "eps unknown"
    text = f"eps={float(eps):.4g}"
    return text + (f" ({eps_255_text(float(eps) * 255)}/255)" if norm == "linf" else "")


def threat_text(threat: dict | None) -> str:
    if not isinstance(threat, dict):
        return "unknown"
    return f"{threat.get('norm')} {eps_text(threat.get('norm'), threat.get('eps'))}"


def update_text(update: dict | None, method: dict, dataset: dict | None) -> str | None:
    """The update rule around the loss, from results.json's `run.update` (its resolved settings) or, for
    runs written before it existed, from the config."""
    if not update:
        from runner.update import describe_update

        update = describe_update({"method": method, "dataset": dataset or {}})
    if update.get("rule") in ("sam", "asam"):
        reuse = ", attack reused" if update.get("attack") == "reuse" else ""
        reuse += f", m={update['m']}" if isinstance(update.get("m"), int) else ""
        shape = ""
        if update.get("scale") == "weights" or update.get("eta"):
            where = "weights only" if update.get("scale") == "weights" else "every parameter"
            shape = f" (T = |w| + {value_text(update.get('eta') or 0)} on {where})"
        return f"{update['rule'].upper()} rho={value_text(update.get('rho'))}{shape}{reuse}"
    if update.get("rule") == "awp":
        warmup = update.get("warmup_epochs") or 0
        return f"AWP gamma={value_text(update.get('gamma'))}" + (f" after {warmup} epochs" if warmup else "")
    return None


def recipe_text(method: dict | None, train_eps: float | None, norm: str | None, update: dict | None = None,
                dataset: dict | None = None) -> str:
    """The training method with what decides its robustness: e.g. "at: PGD-10 at 1.2 x eps = 0.12"."""
    if not isinstance(method, dict) or not method.get("name"):
        return "erm (plain training)"
    parts = []
    attack = method.get("attack")
    if isinstance(attack, dict):
        factor = attack.get("eps_factor", 1.0) or 1.0
        text = f"PGD-{attack.get('steps')}"
        if (attack.get("restarts") or 1) > 1:
            text += f" x {attack['restarts']} restarts"
        if train_eps is not None:
            text += (f" at {factor:g} x eps = {factor * train_eps:.4g}" if factor != 1
                     else f" at eps = {train_eps:.4g}") + (f" {norm}" if norm else "")
        if attack.get("alpha") is not None:
            text += f", step {attack['alpha']:.4g}"
        parts.append(text)
    elif "eps_factor" in method and train_eps is not None:  # certified training: its own ramp
        factor = method["eps_factor"]
        ramp = (f", ramp {method.get('ramp', '')} over {method['ramp_epochs']:g} epochs after "
                f"{method.get('warmup_epochs', 0):g} at eps 0" if "ramp_epochs" in method else "")
        parts.append(f"bounds at {factor:g} x eps = {factor * train_eps:.4g}{ramp}")
    for key in ("beta", "alpha", "r", "kappa"):
        if key in method and not isinstance(method[key], dict) and method[key] is not None:
            parts.append(f"{key}={value_text(method[key])}")
    rule = update_text(update, method, dataset)
    if rule:
        parts.append(rule)
    return f"{method['name']}: " + ", ".join(parts) if parts else method["name"]


def _software(env: dict) -> str:
    versions = env.get("versions") or {}
    git = env.get("git")
    dirty = env.get("git_dirty")
    commit = f"git {git[:10]}" + (", uncommitted changes" if dirty else "") if git else "git commit unknown"
    return (f"robust-train {versions.get('robust-train') or 'unknown'} ({commit}), "
            f"torch {env.get('torch') or 'unknown'}, python {env.get('python') or 'unknown'}, "
            f"device {env.get('device') or 'unknown'}")


def checks_line(checks: list[dict]) -> str:
    run = [c for c in checks if not c.get("skipped")]
    skipped = len(checks) - len(run)
    return (f"- checks: {sum(c['passed'] for c in run)} of {len(run)} passed"
            + (f"; {skipped} not run (marked skip: not applicable or an input missing)" if skipped else ""))


def header_lines(cfg, out: dict, model_source: str | None = None, run_dir: Path | None = None) -> list[str]:
    """The compact block that says which model this is and how it was evaluated. `out` is results.json
    (or evaluate's part of it): its `run`, `train`, `train_config`, `env`, `train_env` and `eval_threat`
    sections are used where present, the config otherwise."""
    from omegaconf import OmegaConf

    def select(key, default=None):
        return OmegaConf.select(cfg, key, default=default)

    run, train, env = out.get("run") or {}, out.get("train") or {}, out.get("env") or {}
    train_config = out.get("train_config") or {}
    method_cfg = train_config.get("method") if train_config else None
    if method_cfg is None:
        node = select("method")
        method_cfg = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    method = run.get("method") or method_name({"method": method_cfg})
    eval_threat = out.get("eval_threat") or threat_summary(select("threat.norm"), select("threat.eps", math.nan))
    train_threat = run.get("threat") or eval_threat
    seed = run.get("seed", select("seed"))
    n = select("eval.n_examples")
    epochs = train.get("epochs", select("train.epochs"))
    trained = train.get("epochs_trained")
    ckpt_epoch = train.get("checkpoint_epoch")
    which = train.get("checkpoint")
    if model_source and (ckpt_epoch is None or which is None):  # written before results.json: the source says
        found = re.search(r"epoch (\d+)", model_source)
        ckpt_epoch = int(found.group(1)) if found and ckpt_epoch is None else ckpt_epoch
        named = re.match(r"^(best|last)\.pt\b", model_source)
        which = which or (named.group(1) if named else None)
    which = f"{which}.pt" if which in ("best", "last") else (path_text(which, run_dir) if which else "see model")
    epochs_text = (f"{trained} of {epochs} epochs trained" if trained is not None
                   else f"{epochs} epochs configured")
    if train.get("steps") is not None:
        epochs_text += f", {train['steps']} steps"
    if train.get("wall_time_s") is not None:
        epochs_text += f", {train['wall_time_s']:.1f} s"
    if train.get("training_status"):
        epochs_text += f"; **training unfinished** (its run's status: {train['training_status']})"
    optimizer = train_config.get("optimizer") or {}
    if not optimizer and OmegaConf.is_config(select("optimizer")):
        optimizer = OmegaConf.to_container(select("optimizer"), resolve=True)
    batch = (train_config.get("train") or {}).get("batch_size", select("train.batch_size"))
    optim_text = (f"; {optimizer.get('name')} lr {number(optimizer.get('lr'))}, batch {batch}"
                  if optimizer.get("name") else "")
    dataset_cfg = train_config.get("dataset")
    if dataset_cfg is None and OmegaConf.is_config(select("dataset")):
        dataset_cfg = OmegaConf.to_container(select("dataset"), resolve=True)
    recipe = recipe_text(method_cfg, train_threat.get("eps"), train_threat.get("norm"), run.get("update"), dataset_cfg)
    lines = [
        f"# Evaluation report: {method} on {run.get('dataset') or select('dataset.name')}, "
        f"{run.get('model') or select('model.name')}",
        "",
        *([f"- model: {model_source}"] if model_source else []),
        f"- trained: training seed {seed}; {recipe}"
        f"; threat {threat_text(train_threat)}{optim_text}",
        f"- training length: {epochs_text}; evaluated checkpoint: {which}"
        f" (epoch {ckpt_epoch if ckpt_epoch is not None else 'unknown'})",
    ]
    train_env = out.get("train_env")
    if train_env:
        lines.append(f"- trained with: {_software(train_env)}")
    elif "train_env" in out:
        lines.append("- trained with: unknown (the checkpoint does not record its software)")
    lines += [
        f"- evaluated with: {_software(env)}" if env else "- evaluated with: (software recorded in results.json)",
        f"- evaluation threat: {threat_text(eval_threat)}"
        + (" (**differs from the training threat**)" if _differs(train_threat, eval_threat) else ""),
        f"- suite: `{select('eval.name')}`; evaluation seed {select('eval.seed')}; "
        f"examples: {'the whole test split' if n is None else f'the first {n}'} in its fixed order "
        "(independent of every seed)",
        checks_line(out["checks"]),
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    if any(s.get("regenerated") for s in out["eval"].values()):
        lines.append(
            "- common corruptions: **regenerated** here with CIFAR-10-C constants (not the released "
            "-C files); compare only runs with the same corruption seed and examples"
        )
    methods = ci_methods(out["eval"])
    if methods:
        lines.append("- 95% intervals: " + "; ".join(
            f"{method} ({', '.join(f'`{e}`' for e in evaluators)})" for method, evaluators in methods.items()
        ))
    return lines


def _differs(a: dict, b: dict) -> bool:
    return (a.get("norm"), a.get("eps")) != (b.get("norm"), b.get("eps"))


def ci_methods(settings: dict) -> dict:
    """{interval method: [evaluators using it]}, each method named once."""
    methods: dict = {}
    for key, s in settings.items():
        if s.get("ci95") and s.get("ci95_method"):
            evaluators = methods.setdefault(s["ci95_method"], [])
            if evaluator_of(key, s) not in evaluators:
                evaluators.append(evaluator_of(key, s))
    return methods
