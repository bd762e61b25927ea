"""Training methods: one module each (`Config` schema + `build(cfg)`), found by name."""

import importlib


def build_method(cfg):
    """The method object for a run config; no method configured means plain ERM."""
    name = cfg.method.name if cfg.get("method") is not None else "erm"
    try:
        module = importlib.import_module(f"runner.methods.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"runner.methods.{name}":
            raise
        raise ValueError(f"method.name={name!r} has no module runner/methods/{name}.py") from None
    return module.build(cfg)


def method_name(cfg) -> str:
    return cfg.method.name if cfg.get("method") is not None else "erm"
