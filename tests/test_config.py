"""Every config option composes through Hydra's compose API; typos and wrong types fail, naming the key."""

from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

CONFIGS = Path(__file__).resolve().parents[1] / "runner" / "configs"
GROUPS = ["dataset", "model", "optimizer", "scheduler", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(compose_cfg, group):
    for option in options(group):
        cfg = compose_cfg(f"{group}={option}")
        assert cfg[group].name, f"{group}={option} has no name"


def test_every_method_composes_with_plus_and_no_method_means_erm(compose_cfg):
    assert compose_cfg().method is None
    for option in options("method"):
        cfg = compose_cfg(f"+method={option}")
        assert cfg.method.name == option


def test_every_experiment_composes(compose_cfg):
    for option in options("experiment"):
        cfg = compose_cfg(f"experiment={option}")
        assert cfg.threat.eps > 0


def test_contract_groups_and_options_exist():
    required = {
        "dataset": {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "synthetic"},
        "model": {"mlp", "cnn_small", "cnn_digits", "cnn_large", "cnn7", "preact_resnet18", "wrn_28_10", "wrn_34_10"},
        "method": {"erm", "at", "trades", "ibp", "hr", "sam"},
        "eval": {"none", "quick", "standard", "certified", "corruptions", "full"},
        "experiment": {"cifar10_at", "cifar10_trades", "mnist_ibp", "cifar10_ibp"},
        "optimizer": {"sgd", "adam", "adamw"},
        "scheduler": {"cosine", "multistep", "onecycle", "constant"},
        "logger": {"none", "wandb"},
    }
    for group, names in required.items():
        assert names <= set(options(group)), f"{group} lacks {names - set(options(group))}"


def test_defaults_and_contract_keys(compose_cfg):
    cfg = compose_cfg()
    assert cfg.dataset.name == "digits" and cfg.eval.name == "quick"
    assert cfg.threat.norm == "linf" and cfg.threat.eps == pytest.approx(0.1)
    for key in ["seed", "deterministic", "device", "resume", "train.epochs", "train.batch_size",
                "dataset.data_dir", "dataset.download", "dataset.label_noise", "dataset.label_noise_kind"]:
        node, *rest = key.split(".")
        assert node in cfg and (not rest or rest[0] in cfg[node]), key


def test_dataset_sets_its_customary_eps(compose_cfg):
    assert compose_cfg("dataset=cifar10").threat.eps == pytest.approx(8 / 255)
    assert compose_cfg("dataset=mnist").threat.eps == pytest.approx(0.3)
    assert compose_cfg("dataset=cifar10", "threat.eps=0.01").threat.eps == pytest.approx(0.01)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.epochz=3"], "epochz"),
        (["dataset=digitz"], "digitz"),
        (["train.epochs=many"], "train.epochs"),
        (["+method=at", "method.attack.stepz=3"], "stepz"),
        (["+method=at", "method.attack.steps=ten"], "method.attack.steps"),
        (["model.widht=2"], "widht"),
    ],
)
def test_typos_and_wrong_types_fail_naming_the_key(compose_cfg, overrides, named):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_cfg(*overrides)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["+method=at", "method.attack.eps_factor=-1"], "method.attack.eps_factor"),
        (["+method=at", "method.attack.steps=0"], "method.attack.steps"),  # would silently train ERM
        (["+method=ibp", "method.kappa_start=1.5"], "method.kappa_start"),
        (["+method=ibp", "method.kappa_end=-0.1"], "method.kappa_end"),
        (["+method=erm", "method.rho=0.5"], "method.sam=true"),
        (["+method=at", "method.adaptive=true"], "SAM is off"),
        (["eval.evaluators=[{name: pgd, eps: 2}]"], "eval.evaluators[0].eps"),
        (["eval.evaluators=[{name: pgd, eps: [0.1, 3]}]"], "eval.evaluators[0].eps"),
        (["dataset.augment=crop", "dataset.crop_padding=8"], "dataset.crop_padding"),
        (["dataset.crop_padding=-1"], "dataset.crop_padding"),
        (["dataset.val_size=0", "+method=at"], "dataset.val_size"),  # AT reports best.pt: needs validation
        (["dataset.val_size=0", "eval.checkpoint=best"], "dataset.val_size"),
        (["+method=ibp", "method.val_batch_size=0"], "method.val_batch_size"),
        (["+method=crown_ibp", "method.val_batch_size=-5"], "method.val_batch_size"),
        (["+method=hr", "method.r=inf"], "method.r"),  # a limit, not a setting: failed at the first step
        (["dataset.test_size=5000"], "dataset.test_size"),
        (["dataset.test_size=0"], "dataset.test_size"),  # trained, then failed at evaluation
        (["dataset=cifar10", "dataset.test_size=20"], "dataset.test_size"),  # was silently ignored
        (["dataset=synthetic", "dataset.n_samples=5"], "dataset.n_samples"),
        (["dataset=synthetic", "dataset.n_samples=100"], "dataset.test_size"),
        (["dataset=synthetic", "dataset.image_size=2", "model=cnn_small"], "dataset.image_size"),
    ],
)
def test_bad_values_fail_before_the_run_naming_the_key(compose_cfg, overrides, named):
    from runner.errors import ConfigError
    from runner.validation import check_run

    with pytest.raises(ConfigError) as info:
        check_run(compose_cfg(*overrides))
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [["+method=sam", "method.rho=0.3"], ["+method=at", "method.sam=true",
                                        "method.adaptive=true"], ["eval.evaluators=[{name: pgd, eps: 0.2}]"]])
def test_good_values_pass(compose_cfg, overrides):
    from runner.validation import check_run

    check_run(compose_cfg(*overrides))


def test_an_empty_run_dir_is_rejected():
    from runner.errors import ConfigError
    from runner.validation import check_writable_dir

    with pytest.raises(ConfigError, match="hydra.run.dir"):
        check_writable_dir("", "hydra.run.dir")
