"""AutoAttack (Croce & Hein 2020) through the official package `pyautoattack`, version "standard":
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries); a point is robust only if it
survives all four, and each attack sees only the points still robust.

The cascade is driven here one attack and one batch at a time, each step a call of the package's own
`run_standard_evaluation` on exactly the points and batch the package itself would use (the clean
pass in chunks of `batch_size`, then each attack on the still-robust points in index order, chunks of
`batch_size`, the same seed). The number therefore equals a direct
`AutoAttack(model, ...).run_standard_evaluation(x, y, batch_size=...)` on the same examples
(tests/test_eval_suite.py checks this), while this driver adds what the package lacks:
- resume: a state file (under <run dir>/autoattack/, keyed by a fingerprint of model, data and
  settings) written after every batch; an interrupted evaluation continues where it stopped and
  gives the same result. (pyautoattack 0.2.0's own `state_path` cannot restore: it writes the attack
  set as a string, then refuses the file as "a different set of attacks".)
- progress lines per batch, per-attack robust accuracy (`autoattack/after_<attack>/acc`), checks that
  the adversarial points lie in the ball and in [0, 1], and the package's own warnings as a check.

`skip_fooled_by: [pgd]` also leaves out points an earlier evaluator already broke (faster); the
result is then the per-point worst case over that evaluator and AutoAttack, which differs from a
direct AutoAttack run by attack randomness, so settings say `equals_direct_run: false`.
"""

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from runner.attacks import NORMS, model_mode
from runner.evaluators.base import EvalResult, Evaluator, check_keys
from runner.evaluators.pgd import eps_list, positive_int, requested_eps, spec_error, threat_key
from runner.tracking import log

KEYS = {
    "name",
    "version",
    "eps",
    "eps_factors",
    "norm",
    "batch_size",
    "n_examples",
    "skip_fooled_by",
    "resume",
    "seed",
}
VERSIONS = ("standard", "plus", "rand")
PACKAGE_NORM = {"linf": "Linf", "l2": "L2"}
STATE_DIR = "autoattack"
# Floating-point slack when checking the returned points: the package clamps in fp32.
BALL_TOLERANCE = 1e-5


def _bits(mask: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def _mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def fingerprint(model, x, y, settings: dict) -> str:
    """What makes a saved state valid: the same weights, examples, labels and attack settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in (x, y):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class CapturedWarnings(logging.Handler):
    """Collects the package's warnings (randomised/dynamic defence, probabilities, zero gradients)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


class CascadeState:
    """Progress of one cascade, saved atomically after every batch when a path is given."""

    def __init__(self, path: Path | None, key: str, attacks: list[str]):
        self.path, self.key, self.attacks = path, key, attacks
        self.clean = self.robust = self.attack_start = None
        self.attack_index = 0
        self.batches_done = 0
        self.fooled_by = {name: 0 for name in attacks}
        self.robust_after: dict[str, int] = {}
        self.max_norm = 0.0
        self.range_violation = 0.0
        self.elapsed_s = 0.0
        self.resumed = False

    @classmethod
    def load_or_new(cls, path: Path | None, key: str, attacks: list[str]) -> "CascadeState":
        state = cls(path, key, attacks)
        if path is None or not path.exists():
            return state
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.info(f"autoattack: ignoring unreadable state {path} ({err}); starting over")
            return state
        if saved.get("key") != key or saved.get("attacks") != attacks:
            return state
        state.clean, state.robust = _mask(saved["clean"]), _mask(saved["robust"])
        state.attack_start = _mask(saved["attack_start"]) if saved.get("attack_start") else None
        for name in (
            "attack_index",
            "batches_done",
            "fooled_by",
            "robust_after",
            "max_norm",
            "range_violation",
            "elapsed_s",
        ):
            setattr(state, name, saved[name])
        state.resumed = True
        return state

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": self.key,
            "attacks": self.attacks,
            "clean": _bits(self.clean),
            "robust": _bits(self.robust),
            "attack_start": _bits(self.attack_start) if self.attack_start is not None else None,
            "attack_index": self.attack_index,
            "batches_done": self.batches_done,
            "fooled_by": self.fooled_by,
            "robust_after": self.robust_after,
            "max_norm": self.max_norm,
            "range_violation": self.range_violation,
            "elapsed_s": self.elapsed_s,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.path)


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def run_cascade(
    model,
    x,
    y,
    *,
    eps: float,
    norm: str,
    version: str,
    seed: int,
    batch_size: int,
    skip: torch.Tensor | None = None,
    state_path: Path | None = None,
    label: str = "autoattack",
):
    """The AutoAttack cascade on (x, y); returns (CascadeState, attack objects' settings, warnings).

    `skip` (bool per point): points already known non-robust; they are not attacked.
    """
    from pyautoattack import AutoAttack

    device = x.device
    package_logger = logging.getLogger("auto-attack")
    captured = CapturedWarnings()
    saved_propagate, saved_level = package_logger.propagate, package_logger.level
    package_logger.addHandler(captured)
    package_logger.propagate = False  # its warnings become a check instead of stray stderr lines
    package_logger.setLevel(logging.WARNING)
    # The package reseeds the global RNG inside every attack; keep the caller's RNG untouched.
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), model_mode(model, "eval"):
            attack = AutoAttack(
                model, norm=PACKAGE_NORM[norm], eps=eps, version=version, seed=seed, device=device
            )
            attacks = list(attack.attacks_to_run)
            described = describe(attack)
            settings_key = {
                "eps": eps,
                "norm": norm,
                "version": version,
                "seed": seed,
                "batch_size": batch_size,
                "skip": _bits(skip) if skip is not None else None,
                "device": device.type,
                "package": package_version(),
            }
            key = fingerprint(model, x, y, settings_key)
            state = CascadeState.load_or_new(state_path, key, attacks)
            if state.resumed:
                log.info(
                    f"{label}: resuming from {state_path} ({state.attack_index}/{len(attacks)} attacks done)"
                )
            began = time.perf_counter() - state.elapsed_s
            if state.clean is None:
                state.clean = clean_flags(model, x, y, batch_size)  # the package's own first pass
                state.robust = (
                    state.clean & ~skip.to(state.clean.device) if skip is not None else state.clean.clone()
                )
                state.save()
            while state.attack_index < len(attacks):
                name = attacks[state.attack_index]
                if state.attack_start is None:
                    state.attack_start = state.robust.clone()
                # The batches are fixed when the attack starts: chunks of the points robust then.
                candidates = state.attack_start.nonzero().flatten()
                batches = [candidates[i : i + batch_size] for i in range(0, len(candidates), batch_size)]
                attack.attacks_to_run = [name]
                for b in range(state.batches_done, len(batches)):
                    index = batches[b].to(device)
                    xb, yb = x[index], y[index]
                    x_adv, y_adv = attack.run_standard_evaluation(xb, yb, batch_size=batch_size)
                    fooled = (y_adv != yb).cpu()
                    state.robust[batches[b][fooled]] = False
                    state.fooled_by[name] += int(fooled.sum())
                    if fooled.any():
                        f = fooled.to(device)
                        norms = perturbation_norms(x_adv[f], xb[f], norm)
                        state.max_norm = max(state.max_norm, float(norms.max()))
                        outside = torch.maximum(-x_adv[f].amin(), x_adv[f].amax() - 1).clamp_min(0)
                        state.range_violation = max(state.range_violation, float(outside))
                    state.batches_done = b + 1
                    state.elapsed_s = time.perf_counter() - began
                    state.save()
                    log.info(
                        f"{label} eps={eps:.4g} {name}: batch {b + 1}/{len(batches)} "
                        f"fooled {int(fooled.sum())}/{len(index)}; "
                        f"robust {state.robust.float().mean().item():.2%} ({state.elapsed_s:.0f}s)"
                    )
                state.robust_after[name] = int(state.robust.sum())
                state.attack_index += 1
                state.batches_done = 0
                state.attack_start = None
                state.elapsed_s = time.perf_counter() - began
                state.save()
    finally:
        package_logger.removeHandler(captured)
        package_logger.propagate, package_logger.level = saved_propagate, saved_level
    return state, described, captured.messages


@torch.no_grad()
def clean_flags(model, x, y, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [
            model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]
            for i in range(0, len(y), batch_size)
        ]
    ).cpu()


def describe(attack) -> dict:
    """The settings the package actually uses for this version (read back from its attack objects)."""
    return {
        "apgd-ce": {
            "n_iter": attack.apgd.n_iter,
            "restarts": attack.apgd.n_restarts,
            "loss": "ce",
            "rho": attack.apgd.thr_decr,
            "eot_iter": attack.apgd.eot_iter,
        },
        "apgd-t": {
            "n_iter": attack.apgd_targeted.n_iter,
            "restarts": attack.apgd_targeted.n_restarts,
            "target_classes": attack.apgd_targeted.n_target_classes,
            "loss": "dlr-targeted",
        },
        "fab-t": {"n_iter": attack.fab.n_iter, "restarts": 1, "target_classes": attack.fab.n_target_classes},
        "square": {"n_queries": attack.square.n_queries, "p_init": attack.square.p_init},
    }


def package_version() -> str:
    import pyautoattack

    return f"pyautoattack {pyautoattack.__version__}"


def square_beats_white_box(state: CascadeState, attacks: list[str], n: int, label: str) -> dict | None:
    """Square runs last: every point it fools survived the white-box attacks (gradient masking sign)."""
    if "square" not in attacks or attacks[-1] != "square":
        return None
    from runner.evaluators.sanity import square_check

    white_box = [a for a in attacks if a != "square"]
    return square_check(state.fooled_by["square"], n, f"{label} ({', '.join(white_box)} before Square)")


class AutoAttackEvaluator(Evaluator):
    name = "autoattack"

    def __init__(self, spec: dict, cfg):
        super().__init__(spec, cfg)
        check_keys(spec, KEYS, "autoattack")
        self.version = spec.get("version", "standard")
        if self.version not in VERSIONS:
            raise spec_error("autoattack", "version", f"must be one of {VERSIONS}, got {self.version!r}")
        self.norm = spec.get("norm")
        if self.norm is not None and self.norm not in NORMS:
            raise spec_error("autoattack", "norm", f"must be one of {NORMS}, got {self.norm!r}")
        requested_eps(spec, "autoattack")
        # null: the suite's eval.batch_size, and every evaluation point.
        self.batch_size, self.n_examples = (
            positive_int(spec, "autoattack", key, 1) if spec.get(key) is not None else None
            for key in ("batch_size", "n_examples")
        )
        self.skip_fooled_by = list(spec.get("skip_fooled_by") or [])
        if "clean" in self.skip_fooled_by:
            self.skip_fooled_by.remove("clean")  # the cascade starts from the clean pass anyway
        self.resume = spec.get("resume", True)
        if not isinstance(self.resume, bool):
            raise spec_error("autoattack", "resume", f"must be true or false, got {self.resume!r}")
        self.seed = spec.get("seed")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise spec_error("autoattack", "seed", f"must be an integer or null, got {self.seed!r}")

    def skip_mask(self, ctx, key: str, n: int) -> tuple[torch.Tensor | None, list[str]]:
        """Points an earlier evaluator already broke at this eps (per-example masks of the suite)."""
        skip, used = None, []
        for name in self.skip_fooled_by:
            if name not in ctx.per_example:
                raise spec_error(
                    "autoattack",
                    "skip_fooled_by",
                    f"names {name!r}, which no earlier evaluator in the suite produced; "
                    f"have {sorted(ctx.per_example)} (list it before autoattack)",
                )
            # The mask at this eps: 'pgd' at the threat point, 'pgd/eps_0.2' on the curve.
            mask_name = (
                name
                if key == "autoattack/acc"
                else f"{name}{key.removeprefix('autoattack').removesuffix('/acc')}"
            )
            mask = ctx.per_example.get(mask_name)
            if mask is None or len(mask) < n:
                continue
            fooled = ~mask[:n].cpu()
            skip = fooled if skip is None else skip | fooled
            used.append(mask_name)
        return skip, used

    def __call__(self, model, x, y, ctx):
        result = EvalResult()
        norm = self.norm or ctx.norm
        seed = ctx.seed if self.seed is None else self.seed
        batch_size = self.batch_size or ctx.batch_size
        if self.n_examples is not None:
            x, y = x[: self.n_examples], y[: self.n_examples]
        n = len(y)
        for eps in eps_list(self.spec, "autoattack", ctx.eps, norm, ctx.norm):
            key = threat_key("autoattack", norm, eps, ctx.norm, ctx.eps)
            skip, used = self.skip_mask(ctx, key, n)
            state_path = None
            if self.resume and ctx.run_dir is not None:
                state_path = (
                    Path(ctx.run_dir) / STATE_DIR / f"{key.removesuffix('/acc').replace('/', '_')}.json"
                )
            state, described, warnings = run_cascade(
                model,
                x,
                y,
                eps=eps,
                norm=norm,
                version=self.version,
                seed=seed,
                batch_size=batch_size,
                skip=skip,
                state_path=state_path,
                label="autoattack",
            )
            attacks = state.attacks
            robust = state.robust
            result.metrics[key] = int(robust.sum()) / n
            base = key.removesuffix("/acc")
            for name in attacks:
                if name in state.robust_after:
                    result.metrics[f"{base}/after_{name}/acc"] = state.robust_after[name] / n
                    result.settings[f"{base}/after_{name}/acc"] = {
                        "attack": f"autoattack cascade up to {name}",
                        "norm": norm,
                        "eps": eps,
                        "eps_255": round(eps * 255, 3),
                        "n_examples": n,
                        "seed": seed,
                    }
            result.settings[key] = {
                "attack": "autoattack",
                "version": self.version,
                "attacks": attacks,
                "package": package_version(),
                "attack_settings": described,
                "steps": f"{described['apgd-ce']['n_iter']} (APGD, FAB); "
                f"Square {described['square']['n_queries']} queries",
                "restarts": described["apgd-ce"]["restarts"],
                "norm": norm,
                "eps": eps,
                "eps_255": round(eps * 255, 3),
                "n_examples": n,
                "seed": seed,
                "batch_size": batch_size,
                "points_attacked": int((state.clean & ~skip).sum())
                if skip is not None
                else int(state.clean.sum()),
                "skip_fooled_by": used,
                "equals_direct_run": not used,
                "fooled_by": dict(state.fooled_by),
                "resumed": state.resumed,
                "state_file": str(state_path) if state_path else None,
                "time_s": round(state.elapsed_s, 3),
            }
            result.per_example["autoattack" if key == "autoattack/acc" else base] = robust.clone()
            result.checks += self.checks(state, warnings, ctx, norm, eps, n, key)
        return result

    def checks(self, state, warnings, ctx, norm, eps, n, key) -> list[dict]:
        label = key.removesuffix("/acc")
        limit = eps * (1 + BALL_TOLERANCE) + BALL_TOLERANCE
        checks = [
            {
                "name": f"{label} perturbations inside the ball and [0,1]",
                "passed": state.max_norm <= limit and state.range_violation <= BALL_TOLERANCE,
                "detail": f"largest {norm} norm of a returned adversarial point {state.max_norm:.6g} "
                f"(eps {eps:.6g}); largest step outside [0,1] {state.range_violation:.3g}",
            },
            {
                "name": f"{label} package raised no warnings",
                "passed": not warnings,
                "detail": "; ".join(warnings)
                if warnings
                else "no randomised/dynamic-defence, probability-output "
                "or zero-gradient warnings from pyautoattack",
            },
        ]
        clean = ctx.per_example.get("clean")
        if clean is not None and len(clean) >= n:
            disagree = int((clean[:n].cpu() != state.clean).sum())
            checks.append(
                {
                    "name": f"{label} clean pass agrees with the clean evaluator",
                    "passed": disagree == 0,
                    "detail": f"{disagree} of {n} points classified differently (non-deterministic forward?)",
                }
            )
        square = square_beats_white_box(state, state.attacks, n, label)
        if square is not None:
            checks.append(square)
        return checks


def build(spec, cfg):
    return AutoAttackEvaluator(dict(spec), cfg)


__all__ = ["AutoAttackEvaluator", "build", "run_cascade"]
