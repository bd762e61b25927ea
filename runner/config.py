"""Structured-config schemas: every group is validated at compose time, so a typo or a wrong type
fails before any work starts, with the key named.

Groups mirror the code: a method's schema is the `Config` dataclass of its module in
`runner/methods/`, found by name, so a new method costs one module and one YAML file.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

CONFIG_DIR = "pkg://runner.configs"


@dataclass
class ThreatConfig:
    norm: str = "linf"  # linf | l2
    eps: float = MISSING  # pixel units in [0, 1]; each dataset sets its customary default


@dataclass
class DatasetConfig:
    name: str = MISSING
    data_dir: str = "${oc.env:ROBUST_TRAIN_DATA,data}"
    download: bool = True  # tried only when the files are missing; offline it fails with a clear message
    eps: float = 0.1  # the dataset's customary threat.eps
    # This dataset's recipe for the methods' defaults (the method YAMLs read them; `method.*=` overrides):
    train_eps_factor: float = 1.0  # AT/HR/TRADES training-attack radius / threat.eps (method.attack.eps_factor)
    trades_beta: float = 6.0  # TRADES beta (method.beta): the reference uses 6 on CIFAR-10, 1 on MNIST
    sam_rho: float = 0.05  # SAM's rho when method.rho is null (Foret et al.'s default)
    asam_rho: float = 2.0  # ASAM's (method.adaptive=true): its perturbation is scaled by |w|, so ~10x SAM's
    val_size: int = 0  # held-out validation images cut from the training set (model selection)
    # Train on a seeded random subset of the training split (after the validation cut, before label noise):
    # HR's statistical-error experiments train MNIST on 5%. 1.0: all of it.
    train_fraction: float = 1.0
    test_size: int = 0  # only for datasets without an official test split (digits, synthetic)
    augment: str = "none"  # none | crop_flip | crop
    crop_padding: int = 4
    # What the crop sees beyond the border: zeros (torchvision's RandomCrop default, TRADES, fast AT),
    # edge (Shi et al.'s IBP code) or reflect (Rice et al.'s cifar10-fast pipeline).
    crop_padding_mode: str = "zeros"
    # The model's input normalisation (its first layer), per channel; null: the dataset's own statistics.
    # Some references use other constants: Shi et al. CIFAR-10 std (0.2023, 0.1994, 0.2010), MNIST none.
    mean: list | None = None
    std: list | None = None
    label_noise: float = 0.0  # fraction of training labels flipped (never validation or test)
    label_noise_kind: str = "symmetric"  # symmetric | asymmetric (y+1 mod K) | patrini (class look-alikes)
    # synthetic only
    n_samples: int = 2000
    num_classes: int = 10
    channels: int = 1
    image_size: int = 8


@dataclass
class ModelConfig:
    name: str = MISSING
    width: int = 1  # width multiplier / widen factor
    depth: int = 0  # 0: the architecture's own depth
    batch_norm: bool = True
    hidden: list = field(default_factory=lambda: [256, 256])  # mlp


@dataclass
class MethodConfig:
    """Keys every method has. SAM is an update rule around any method's loss: `method.sam=true`."""

    name: str = MISSING
    sam: bool = False
    rho: float | None = None  # SAM radius; None: the dataset's dataset.sam_rho (or asam_rho when adaptive)
    adaptive: bool = False  # ASAM
    # ASAM's T = |w| + asam_eta on every parameter (all: davda54/sam) or on weights only (weights: SamsungLabs/ASAM,
    # whose class uses eta 0.01 and its CIFAR example 0).
    asam_scale: str = "all"
    asam_eta: float = 0.0
    # SAM around a method with an attack (AT, TRADES, HR): rerun solves the attack again at w + e, the exact
    # gradient of the composite loss; reuse keeps the first pass's adversarial batch (AWP-style), which
    # saves one whole attack per step (SAM + PGD-10 AT on cnn_small: 2.02x AT's step rerun, 1.12x reuse).
    sam_attack: str = "rerun"
    # m-sharpness (Foret et al.): chunks of sam_m images each get their own perturbation and gradient, as
    # their code does per accelerator (32 of 256 images on CIFAR-10); null: the whole batch (davda54/sam).
    sam_m: int | None = None
    # AWP (Wu et al. 2020): layer-wise adversarial weight perturbation around the method's loss (runner/awp.py).
    awp: bool = False
    awp_gamma: float | None = None  # None: the method's reference value (AT 0.01, TRADES 0.005)
    awp_warmup: int = 0  # epochs of plain updates first (the reference: AT 0, TRADES 10)


@dataclass
class AttackConfig:
    """The training attack (the shared PGD). alpha None: 2.5·eps/steps, or 1.25·eps when steps = 1."""

    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    random_start: bool = True
    bn_mode: str = "eval"  # BN mode while generating attacks: eval (TRADES, Madry) | train (Rice, fast AT)
    eps_factor: float = 1.0  # the training attack's radius is eps_factor · threat.eps (validation: threat.eps)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    grad_clip: float | None = None  # max global grad norm (SAM: applied to the second gradient)
    log_every: int = 50  # plain log line every N steps (SLURM logs and CI have no TTY)
    val_every: int = 1  # epochs between validations (best.pt selection)
    precision: str = "fp32"  # fp32 | bf16 (training only; evaluation attacks always run in fp32)
    channels_last: bool = False
    compile: bool = False
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    max_skips: int = 10  # with nonfinite=skip, stop after this many skipped steps
    progress: str = "auto"  # auto (rich bar on a TTY) | rich | plain
    # Catastrophic-overfitting guard (Wong et al. 2020): after each epoch the method's validation metric is
    # measured on that epoch's first training batch; a fall of more than this (accuracy, 0-1) from the
    # previous epoch stops training with the last good epoch's model put back, and flags the run. null: off.
    # (last.pt then carries that copy too: twice the model's size.)
    collapse_drop: float | None = None


@dataclass
class OptimizerConfig:
    name: str = MISSING  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = MISSING  # cosine | multistep | onecycle | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0, in (fractional) epochs
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # multistep: fractions of training
    gamma: float = 0.1  # multistep factor
    pct_start: float = 0.5  # onecycle: fraction of training spent rising (fast AT: 0 -> max -> 0)
    final_lr_ratio: float = 0.0  # cosine: lr at the end / initial lr
    # [low, high]: SGD's momentum moves against the lr, high at lr 0 and low at the peak (torch's CyclicLR
    # does this by default: fast AT's reference cycles 0.9 -> 0.8 -> 0.9). null: momentum stays fixed.
    cycle_momentum: list | None = None


@dataclass
class EvalConfig:
    name: str = MISSING
    n_examples: int | None = None  # None: the whole test split; else its first n (fixed order)
    batch_size: int = 500
    seed: int = 0  # attack randomness; independent of the training seed
    # Which checkpoint train-then-evaluate uses: best | last | auto. auto: the one the method's reference
    # reports: best.pt (early stopping on the validation score, Rice et al.) for AT, HR and IBP; last.pt,
    # the final model of the fixed schedule, for ERM, SAM and TRADES.
    checkpoint: str = "auto"
    evaluators: list = field(default_factory=list)  # [{name: pgd, steps: 50, ...}, ...]


@dataclass
class LoggerConfig:
    name: str = MISSING  # none | wandb
    project: str = "robust-train"
    entity: str | None = None
    mode: str = "auto"  # auto (offline without credentials) | online | offline | disabled
    tags: list = field(default_factory=list)


@dataclass
class RunConfig:
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: str = "auto"  # auto: continue from <run dir>/checkpoints/last.pt | never | a checkpoint path
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    method: Any = None  # absent: plain ERM
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    ckpt: str | None = None  # robust-eval: the run dir or .pt to evaluate


def method_modules() -> list[str]:
    import runner.methods

    return sorted(m.name for m in pkgutil.iter_modules(runner.methods.__path__) if m.name != "base")


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore; each group's YAML lists its schema first."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema_run", node=RunConfig)
    for group, node in [
        ("dataset", DatasetConfig),
        ("model", ModelConfig),
        ("optimizer", OptimizerConfig),
        ("scheduler", SchedulerConfig),
        ("eval", EvalConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name="schema", node=node)
    for name in method_modules():
        module = importlib.import_module(f"runner.methods.{name}")
        if hasattr(module, "Config"):
            cs.store(group="method", name=f"schema_{name}", node=module.Config)


def compose(overrides: list[str] = (), config_name: str = "train"):
    """The config a command line with these overrides would get, without running anything (tests, API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
