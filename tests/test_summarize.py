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


def test_paired_differences_against_a_baseline(summarize, tmp_path, capsys):
    erm = [0.97, 0.98, 0.96, 0.99]
    sam = [0.98, 0.98, 0.97, 0.985]
    for seed in range(4):
        write_run(tmp_path, f"erm{seed}", "erm", seed, {"clean/acc": erm[seed]})
        write_run(tmp_path, f"sam{seed}", "sam", seed, {"clean/acc": sam[seed]})
    write_run(tmp_path, "sam9", "sam", 9, {"clean/acc": 0.5})  # no ERM run on seed 9: left out of the pairs
    assert summarize.main([str(tmp_path), "--paired", "erm"]) == 0
    printed = capsys.readouterr().out
    diffs = [s - e for s, e in zip(sam, erm)]
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    half = 3.182446305284263 * std / 2  # t(0.975, 3 dof) · s / √4
    with (tmp_path / "paired.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["method"], row["baseline"], row["n_seeds"]) == ("sam", "erm", "4")
    assert float(row["mean_difference"]) == pytest.approx(mean, abs=1e-6)
    assert float(row["ci95"]) == pytest.approx(half, abs=1e-6)
    assert row["at_least"] == "3"  # seed 1 ties, seed 3 loses
    assert f"{mean:+.4f} ± {half:.4f} (≥ on 3/4)" in printed
    assert "Paired against erm" in (tmp_path / "paired.md").read_text()


def test_paired_pairs_within_a_setting_and_names_a_missing_baseline(summarize, tmp_path, capsys):
    for noise, offset in ((0.0, 0.0), (0.3, -0.2)):
        for method, gain in (("erm", 0.0), ("sam", 0.05)):
            path = write_run(tmp_path, f"{method}{noise}", method, 0, {"clean/acc": 0.9 + offset + gain})
            results = json.loads(path.read_text())
            results["run"]["label_noise"] = {"fraction": noise, "kind": "symmetric"}
            path.write_text(json.dumps(results))
    assert summarize.main([str(tmp_path), "--paired", "erm"]) == 0
    with (tmp_path / "paired.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["sam noise=0.3 symmetric"]["baseline"] == "erm noise=0.3 symmetric"
    assert all(float(r["mean_difference"]) == pytest.approx(0.05) for r in rows.values())
    assert all(r["ci95"] == "" for r in rows.values())  # one seed: no interval
    capsys.readouterr()
    assert summarize.main([str(tmp_path), "--paired", "at"]) == 2
    assert "no such method" in capsys.readouterr().err


def test_a_json_list_is_skipped_with_a_note(summarize, tmp_path, capsys):
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "results.json").write_text("[1, 2]")
    assert summarize.main([str(tmp_path)]) == 0
    assert "not a JSON object" in (tmp_path / "summary.md").read_text()


def test_an_unknown_paired_method_writes_nothing(summarize, tmp_path, capsys):
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    (tmp_path / "summary.md").write_text("earlier")
    assert summarize.main([str(tmp_path), "--paired", "foo"]) == 2
    assert "no such method" in capsys.readouterr().err
    assert (tmp_path / "summary.md").read_text() == "earlier"
    assert not (tmp_path / "summary.csv").exists() and not (tmp_path / "tradeoff.png").exists()


def test_out_naming_a_file_is_a_clear_error(summarize, tmp_path, capsys):
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    (tmp_path / "file.txt").write_text("")
    assert summarize.main([str(tmp_path), "--out", str(tmp_path / "file.txt")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_earlier_evaluations_kept_in_a_run_dir_are_not_counted(summarize, tmp_path, capsys):
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    write_run(tmp_path / "r" / "earlier", "2024-01-01_00-00-00", "erm", 0, {"clean/acc": 0.1})
    assert summarize.main([str(tmp_path)]) == 0
    assert "0.1000" not in (tmp_path / "summary.md").read_text()
