"""The "Settings" list under every table: each column's evaluator settings (attack, eps, steps, restarts, n,
eval seed), the checkpoint evaluated and the epochs trained, saying where runs differ."""

from runner.summary.runs import checkpoint_name


def eps_text(norm, eps, eps_255=None) -> str:
    if not isinstance(eps, int | float):
        return ""
    text = f"{norm} eps {eps:g}" if norm else f"eps {eps:g}"
    if norm == "linf":
        text += f" = {eps_255 if isinstance(eps_255, int | float) else eps * 255:.4g}/255"
    return text


ATTACK_NAMES = {"pgd": "PGD", "autoattack": "AutoAttack", "none": "no attack"}


def eval_text(settings) -> str:
    """One evaluator's settings from results.json's eval section, in words."""
    if not isinstance(settings, dict) or not settings:
        return "settings not recorded"
    parts = []
    attack = settings.get("attack") or (f"{settings['verifier']} bounds" if settings.get("verifier") else None)
    if attack:
        name = ATTACK_NAMES.get(attack, str(attack))
        if settings.get("version"):
            name += f" version {settings['version']}"
        if settings.get("methods"):
            name += f" ({', '.join(map(str, settings['methods']))})"
        parts.append(name)
    eps = eps_text(settings.get("norm"), settings.get("eps"), settings.get("eps_255"))
    if eps:
        parts.append(eps)
    steps = settings.get("steps")
    if steps is not None:
        parts.append(f"{steps} steps" if isinstance(steps, int) else f"steps {steps}")
    if settings.get("restarts") is not None:
        parts.append(f"{settings['restarts']} restart{'s' if settings['restarts'] != 1 else ''}")
    if settings.get("n_examples") is not None:
        parts.append(f"n={settings['n_examples']}")
    if settings.get("seed") is not None:
        parts.append(f"eval seed {settings['seed']}")
    return ", ".join(parts) if parts else "settings not recorded"


def span(values: set) -> str:
    numbers = sorted(v for v in values if isinstance(v, int | float))
    if not numbers:
        return "?"
    return f"{numbers[0]:g}" if numbers[0] == numbers[-1] else f"{numbers[0]:g}–{numbers[-1]:g}"


def checkpoint_text(runs: list[dict]) -> str:
    names = sorted({checkpoint_name(r["train"]) or "?" for r in runs})
    epochs = set()
    for r in runs:
        epoch = r["train"].get("checkpoint_epoch")
        if epoch is None and r["train"].get("epochs_trained") is None:  # robust-eval: the checkpoint's epoch
            epoch = r["train"].get("epochs")
        epochs.add(epoch)
    if names == ["?"] and epochs == {None}:
        return "not recorded"
    epoch_text = span(epochs)
    return "/".join(f"{n}.pt" if n != "?" else "?" for n in names) + (
        "" if epoch_text == "?" else f" at epoch{'s' if '–' in epoch_text else ''} {epoch_text}"
    )


def epochs_text(runs: list[dict]) -> str:
    values = set()
    for r in runs:
        trained = r["train"].get("epochs_trained")
        if trained is None and r["from_config"]:
            trained = r["settings"].get("train.epochs")
        if trained is None:
            trained = r["train"].get("epochs")
        values.add(trained)
    return "not recorded" if values == {None} else span(values)


def by_value(items: list[tuple[str, str]]) -> dict:
    """{text: [labels]} in first-seen order, each label once."""
    out: dict = {}
    for label, text in items:
        labels = out.setdefault(text, [])
        if label not in labels:
            labels.append(label)
    return out


def settings_lines(groups: dict, labels: list[str], metrics: list[str]) -> list[str]:
    """The "Settings" list under a table: per metric column, then the checkpoint and the epochs."""
    lines = ["", "Settings:"]

    def line(name: str, values: dict, per_group: bool = False) -> str:
        if len(values) == 1:
            return f"- {name}: {next(iter(values))}"
        what = "per group" if per_group else "**differs between runs**"
        return f"- {name}: {what}: " + "; ".join(f"{text} ({', '.join(ls)})" for text, ls in values.items())

    for metric in metrics:
        items = [
            (label, eval_text(run["eval"].get(metric)))
            for label in labels
            for run in groups[label].values()
            if metric in run["metrics"]
        ]
        if items:
            lines.append(line(f"`{metric}`", by_value(items)))
    checkpoints = by_value([(label, checkpoint_text(list(groups[label].values()))) for label in labels])
    names = {text.split(" at ")[0] for text in checkpoints}
    lines.append(line("checkpoint evaluated", checkpoints, per_group=len(names) == 1))
    epochs = by_value([(label, epochs_text(list(groups[label].values()))) for label in labels])
    lines.append(line("epochs trained", epochs))
    return lines
