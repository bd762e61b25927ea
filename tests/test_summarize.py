"""scripts/summarize.py on fabricated run directories: grouping by method over seeds, mean ± std,
CSV, the trade-off plot, duplicate evaluations and differing settings in the labels."""

import csv
import importlib.util
import json
import os
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(
    root: Path, name: str, method: str, seed: int, metrics: dict, eps: float = 0.1, mtime=None
) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    results = {
        "run": {
            "dataset": "digits",
            "model": "cnn_small",
            "method": method,
            "seed": seed,
            "threat": {"norm": "linf", "eps": eps, "eps_255": eps * 255},
            "label_noise": {"fraction": 0.0, "kind": "symmetric"},
        },
        "metrics": metrics,
    }
    path = run_dir / "results.json"
    path.write_text(json.dumps(results))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


SWEEP = {
    ("erm", 0): {"clean/acc": 0.98, "pgd/acc": 0.40, "autoattack/acc": 0.35},
    ("erm", 1): {"clean/acc": 0.96, "pgd/acc": 0.46, "autoattack/acc": 0.41},
    ("at", 0): {"clean/acc": 0.95, "pgd/acc": 0.85, "autoattack/acc": 0.84, "calibration/ece": 0.02},
    ("at", 1): {"clean/acc": 0.97, "pgd/acc": 0.87, "autoattack/acc": 0.85, "calibration/ece": 0.04},
}


def read_csv(path: Path) -> dict:
    with path.open() as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


def test_sweep_table_csv_and_plot(summarize, tmp_path, capsys):
    for (method, seed), metrics in SWEEP.items():
        write_run(tmp_path, f"+method={method},seed={seed}", method, seed, metrics)
    (tmp_path / "multirun.yaml").write_text("not a run\n")
    assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| at | 0, 1 |" in printed and "`autoattack/acc`" in printed
    rows = read_csv(tmp_path / "summary.csv")
    assert set(rows) == {"at", "erm"} and rows["at"]["n_seeds"] == "2"
    for method in ("at", "erm"):
        values = [SWEEP[method, s]["autoattack/acc"] for s in (0, 1)]
        assert float(rows[method]["autoattack/acc_mean"]) == pytest.approx(statistics.mean(values), abs=1e-6)
        assert float(rows[method]["autoattack/acc_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
    assert rows["erm"]["calibration/ece_mean"] == ""  # ERM runs never measured it: left empty, not 0
    table = (tmp_path / "summary.md").read_text()
    assert f"{statistics.mean([0.95, 0.97]):.4f} ± {statistics.stdev([0.95, 0.97]):.4f}" in table
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "robust = autoattack/acc" in printed


def test_duplicate_evaluations_count_once_and_labels_show_what_differs(summarize, tmp_path):
    write_run(tmp_path, "runs/a", "at", 0, {"clean/acc": 0.9, "pgd/acc": 0.7}, mtime=1_000)
    write_run(tmp_path, "evals/a-again", "at", 0, {"clean/acc": 0.9, "pgd/acc": 0.6}, mtime=2_000)
    write_run(tmp_path, "runs/b", "at", 0, {"clean/acc": 0.8, "pgd/acc": 0.75}, eps=0.2)
    out = tmp_path / "summary"
    assert summarize.main([str(tmp_path), "--out", str(out), "--metrics", "pgd/acc"]) == 0
    rows = read_csv(out / "summary.csv")
    assert set(rows) == {"at linf eps=0.1", "at linf eps=0.2"}
    assert rows["at linf eps=0.1"]["n_seeds"] == "1"
    assert float(rows["at linf eps=0.1"]["pgd/acc_mean"]) == pytest.approx(0.6)  # the newest evaluation
    assert "using the newest" in (out / "summary.md").read_text()


def test_clear_errors(summarize, tmp_path, capsys):
    assert summarize.main([str(tmp_path / "missing")]) == 2
    assert summarize.main([str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    with pytest.raises(SystemExit, match="pgd/acc"):
        summarize.main([str(tmp_path), "--metrics", "pgd/acc"])
