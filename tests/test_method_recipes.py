"""Method configs that carry their training recipe (`+method=ibp` alone is a good IBP run): the recipe
applies to a plain `+method=<name>`, the command line wins over it, experiment presets keep the values
they had before recipes existed, and the run directory, typo errors and robust-eval are unchanged."""

from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIGS = Path(__file__).resolve().parents[1] / "runner" / "configs"
RECIPE_METHODS = ["ibp", "crown_ibp"]


def leaves(node, prefix=""):
    """{dotted key: value} for every leaf of a (plain) nested dict; lists count as leaves."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def yaml_body(path: Path) -> dict:
    """A config file's own values (its defaults list left out)."""
    body = OmegaConf.to_container(OmegaConf.load(path))
    body.pop("defaults", None)
    return body


def group_overrides(path: Path) -> dict:
    """{group: option} for the `override /group: option` entries of a config's defaults list."""
    found = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict):
            for key, option in entry.items():
                if key.startswith("override /"):
                    found[key.removeprefix("override /")] = option
    return found


def assert_composed_as_written(cfg: dict, path: Path) -> None:
    """Every value and group choice written in the YAML file at `path` is in the composed `cfg`."""
    composed = leaves(cfg)
    for key, value in leaves(yaml_body(path)).items():
        assert composed[key] == value, key
    for group, option in group_overrides(path).items():
        assert cfg[group]["name"] == option, group


# ---- the recipe --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RECIPE_METHODS)
def test_plain_method_gets_the_recipe_written_in_its_file(compose_cfg, method):
    path = CONFIGS / "method" / f"{method}.yaml"
    assert path.read_text().startswith("# @package _global_")
    cfg = OmegaConf.to_container(compose_cfg(f"+method={method}"), resolve=True)
    assert_composed_as_written(cfg, path)
    # The method's keys are validated by its schema, and nothing of the recipe lands inside `method`.
    schema = OmegaConf.get_type(compose_cfg(f"+method={method}").method)
    assert schema.__module__ == f"runner.methods.{method}"
    assert set(cfg["method"]) >= {"name", "sam", "rho", "warmup_epochs", "eps_factor"}
    assert not {"optimizer", "model", "train", "eval"} & set(cfg["method"])


@pytest.mark.parametrize("method", RECIPE_METHODS)
def test_the_users_model_wins_over_the_recipes(compose_cfg, method):
    assert group_overrides(CONFIGS / "method" / f"{method}.yaml")["model"] == "cnn_small"
    assert compose_cfg(f"+method={method}").model.name == "cnn_small"
    assert compose_cfg(f"+method={method}", "model=mlp").model.name == "mlp"


@pytest.mark.parametrize("method", RECIPE_METHODS)
def test_command_line_wins_over_the_recipe(compose_cfg, method):
    cfg = compose_cfg(
        f"+method={method}", "optimizer=sgd", "optimizer.lr=0.05", "train.epochs=5", "train.batch_size=16",
        "model.batch_norm=false", "eval=quick", "method.warmup_epochs=1", "method.eps_factor=1.0",
    )
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 16
    assert cfg.model.batch_norm is False
    assert cfg.eval.name == "quick" and [e["name"] for e in cfg.eval.evaluators] == ["clean", "pgd"]
    assert cfg.method.warmup_epochs == 1 and cfg.method.eps_factor == 1.0 and cfg.method.name == method


@pytest.mark.parametrize("method", RECIPE_METHODS)
@pytest.mark.parametrize(
    ("override", "named"),
    [("method.warmup_epoch=3", "warmup_epoch"), ("method.eps_factor=big", "method.eps_factor")],
)
def test_method_key_typos_still_fail_naming_the_key(compose_cfg, method, override, named):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_cfg(f"+method={method}", override)
    assert named in str(info.value)


def test_run_directory_is_named_after_the_command_not_the_recipe():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import runner.cli  # noqa: F401  (registers the run-name resolver and the schemas)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="runner.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+method=ibp"], return_hydra_config=True)
        assert OmegaConf.select(cfg, "hydra.run.dir") == "outputs/runs/method-ibp"
    GlobalHydra.instance().clear()


# ---- experiment presets -----------------------------------------------------------------------------

# The recipe-sensitive values every IBP preset composed to before method configs carried recipes
# (captured from the configs of that time). A method recipe must not leak into a preset.
SHI_METHOD = {
    "method.name": "ibp", "method.ramp": "smooth", "method.eps_factor": 1.0, "method.kappa": "shi",
    "method.kappa_start": 1.0, "method.kappa_end": 0.5, "method.ibp_init": True, "method.reg_lambda": 0.5,
    "method.reg_tol": 0.5, "method.reg_min_eps": 1e-06, "method.val_batch_size": 500, "method.sam": False,
    "method.rho": None, "method.adaptive": False,
}
SHI_CIFAR10 = {
    **SHI_METHOD, "dataset.name": "cifar10", "threat.norm": "linf", "model.name": "cnn7",
    "model.batch_norm": True, "model.width": 1, "optimizer.name": "adam", "optimizer.lr": 5e-4,
    "optimizer.weight_decay": 0.0,
    "scheduler.name": "multistep", "scheduler.milestones": [0.75, 0.875], "scheduler.gamma": 0.2,
    "train.epochs": 160, "train.batch_size": 128, "train.grad_clip": 10.0, "eval.name": "certified",
    "method.warmup_epochs": 1.0, "method.ramp_epochs": 80.0,
}
SHI_MNIST = {
    **SHI_CIFAR10, "dataset.name": "mnist", "scheduler.milestones": [50 / 70, 60 / 70], "train.epochs": 70,
    "train.batch_size": 256, "method.warmup_epochs": 0.0, "method.ramp_epochs": 20.0,
}
PRESETS_BEFORE_RECIPES = {
    "cifar10_ibp": {**SHI_CIFAR10, "threat.eps": 8 / 255},
    "cifar10_ibp_2": {**SHI_CIFAR10, "threat.eps": 2 / 255},
    "mnist_ibp": {**SHI_MNIST, "threat.eps": 0.1},
    "mnist_ibp_03": {**SHI_MNIST, "threat.eps": 0.3},
    "digits_ibp": {
        **SHI_METHOD, "dataset.name": "digits", "threat.norm": "linf", "threat.eps": 0.1,
        "model.name": "cnn_small", "model.batch_norm": True, "model.width": 1, "optimizer.name": "adam",
        "optimizer.lr": 5e-3, "optimizer.weight_decay": 0.0, "scheduler.name": "cosine", "train.epochs": 150,
        "train.batch_size": 64, "train.grad_clip": None, "eval.name": "certified",
        "method.warmup_epochs": 5.0, "method.ramp_epochs": 50.0,
        "method.eps_factor": 1.5, "method.kappa": "gowal",
    },
}


def test_every_preset_that_uses_a_recipe_method_is_listed():
    uses_recipe = {
        path.stem for path in (CONFIGS / "experiment").glob("*.yaml")
        if any(f"/method: {m}" in path.read_text() for m in RECIPE_METHODS)
    }
    assert uses_recipe == set(PRESETS_BEFORE_RECIPES)


@pytest.mark.parametrize("preset", sorted(PRESETS_BEFORE_RECIPES))
def test_ibp_presets_compose_to_the_values_they_had_before_recipes(compose_cfg, preset):
    composed = leaves(OmegaConf.to_container(compose_cfg(f"experiment={preset}"), resolve=True))
    for key, value in PRESETS_BEFORE_RECIPES[preset].items():
        assert composed[key] == pytest.approx(value), key


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_preset_keeps_its_own_values_and_group_choices(compose_cfg, preset):
    path = CONFIGS / "experiment" / f"{preset}.yaml"
    assert_composed_as_written(OmegaConf.to_container(compose_cfg(f"experiment={preset}"), resolve=True), path)


# ---- robust-eval -------------------------------------------------------------------------------------


def test_robust_eval_works_on_a_run_trained_with_the_recipe(compose_cfg, tmp_path):
    from runner.reevaluate import reevaluate
    from runner.train import run

    fast = ["train.epochs=1", "method.warmup_epochs=0", "method.ramp_epochs=1", "train.progress=plain",
            "eval.n_examples=40"]
    results = run(compose_cfg("+method=ibp", *fast), tmp_path / "run")
    assert "certified/ibp/acc" in results["metrics"]
    argv = [f"ckpt={tmp_path / 'run'}", "eval=certified", "eval.n_examples=40"]
    again = reevaluate(compose_cfg(*argv, config_name="eval"), argv, tmp_path / "eval")
    assert again["run"] == results["run"]
    assert again["metrics"] == results["metrics"]
