"""`robust-train --help` / `robust-eval --help`: the fast path (make bench's start-up ratio) answers from
the configs directory alone, stays useful, and leaves every other command line to Hydra."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner import cli

CONFIG_DIR = Path(cli.__file__).parent / "configs"


def _help_in_fresh_process(command: str, flag: str) -> subprocess.CompletedProcess:
    entry = "train_main" if command == "robust-train" else "eval_main"
    script = (
        "import sys\n"
        f"sys.argv = [{command!r}, {flag!r}]\n"
        f"from runner.cli import {entry}\n"
        f"{entry}()\n"
        "heavy = sorted(m for m in ('torch', 'hydra', 'omegaconf', 'wandb', 'rich', 'matplotlib', 'sklearn')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command,flag", [("robust-train", "--help"), ("robust-eval", "-h")])
def test_plain_help_imports_nothing_heavy_and_exits_0(command, flag):
    proc = _help_in_fresh_process(command, flag)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert proc.stdout.startswith(f"{command}: ")


def test_train_help_lists_every_group_option_and_the_defaults():
    text = cli._help_text("robust-train")
    words = set(text.replace(",", " ").replace("*", " ").split())
    for group in ("dataset", "model", "method", "eval", "optimizer", "scheduler", "logger", "experiment"):
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert options and f"\n  {group} " in text, group
        assert set(options) <= words, (group, set(options) - words)
    defaults = [item for item in yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["defaults"]
                if isinstance(item, dict) and "/" not in next(iter(item)) and next(iter(item.values()))]
    assert len(defaults) >= 5
    for item in defaults:  # train.yaml's defaults, marked
        ((group, option),) = item.items()
        assert f"{option}*" in text, (group, option)
    assert "robust-train +method=at" in text and "--cfg job" in text and "--hydra-help" in text


def test_eval_help_names_the_checkpoint_and_skips_training_groups():
    text = cli._help_text("robust-eval")
    assert "ckpt=<run dir or .pt>" in text
    assert "\n  method " not in text and "\n  eval " in text
    # The checkpoint decides the model, data and training: neither is offered as an option here.
    assert "\n  model " not in text and "\n  dataset " not in text and "train.epochs" not in text


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["robust-train", "--help"], "robust-train"),
        (["/venv/bin/robust-eval", "-h"], "robust-eval"),
        (["robust-train", "+method=at", "--help"], None),  # Hydra's help, with the composed config
        (["robust-train", "--hydra-help"], None),
        (["robust-train"], None),
        (["pytest", "--help"], None),
    ],
)
def test_only_a_plain_help_takes_the_fast_path(argv, expected):
    assert cli._plain_help(argv) == expected


def test_help_with_overrides_still_goes_to_hydra(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv = ['robust-train', 'model=mlp', '--help'];"
         "from runner.cli import train_main; train_main()"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "== Config ==" in proc.stdout and "name: mlp" in proc.stdout
