"""How report.md writes a value: numbers to 4 significant digits, eps·255 to 0.1, settings in full with
absolute paths relative to the run directory, a 95% interval as [low, high]. Shared by the header
(`runner.report_header`) and the metric tables (`runner.report_tables`).
"""

import math
from pathlib import Path


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def eps_255_text(value) -> str:
    """eps·255 rounded to 0.1 (6.375 -> 6.4, 8.0 -> 8)."""
    return f"{value:.1f}".removesuffix(".0")


def path_text(text: str, run_dir: Path | None) -> str:
    """An absolute path shown relative to the run directory, or by its file name when outside it."""
    path = Path(text)
    if run_dir is not None:
        try:
            return str(path.resolve().relative_to(Path(run_dir).resolve()))
        except (ValueError, OSError):
            pass
    return path.name


def value_text(value, run_dir: Path | None = None) -> str:
    """A setting in full (never cut mid-token): numbers to 4 significant digits, lists comma-separated,
    mappings as key=value, absolute paths relative to the run directory."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return number(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(value_text(v, run_dir) for v in value) if value else "none"
    if isinstance(value, dict):
        if not value:
            return "none"
        return ", ".join(
            f"{k} ({value_text(v, run_dir)})" if isinstance(v, dict) else f"{k}={value_text(v, run_dir)}"
            for k, v in value.items()
        )
    text = str(value)
    if text.startswith("/") and " " not in text:
        text = path_text(text, run_dir)
    return text.replace("|", "\\|").replace("\n", " ")


def ci_text(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def metric_value_text(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else value_text(value)
