"""Training methods: one module each (`Config` schema + `build(cfg)`), found by name."""

import importlib


def build_method(cfg):
    """The method object for a run config; no method configured means plain ERM."""
    name = method_name(cfg)
    try:
        module = importlib.import_module(f"runner.methods.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"runner.methods.{name}":
            raise
        raise ValueError(f"method.name={name!r} has no module runner/methods/{name}.py") from None
    return module.build(cfg)


def method_name(config) -> str:
    """The method a run config (or a saved config's plain dict) trains with: no method means plain ERM."""
    method = config.get("method") if config is not None else None
    return str((method.get("name") if hasattr(method, "get") else None) or "erm")
