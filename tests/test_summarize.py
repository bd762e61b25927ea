"""scripts/summarize.py on fabricated run directories: grouping by method over seeds, mean ± std,
CSV, the trade-off plot, duplicate evaluations and differing settings in the labels."""

import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from runner.summary.plot import robust_axis_label
from runner.summary.runs import load_runs

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


# ---- runs with a resolved config (results.json "config"), as robust-train writes them ----------------------

def config(method=None, seed=0, epochs=2, lr=0.1, pgd_steps=50, device="auto", checkpoint="auto") -> dict:
    return {
        "seed": seed, "deterministic": False, "device": device, "resume": "auto",
        "threat": {"norm": "linf", "eps": 0.1},
        "train": {"epochs": epochs, "batch_size": 64, "log_every": 50, "progress": "auto"},
        "dataset": {"name": "digits", "data_dir": "data", "download": True, "label_noise": 0.0,
                    "label_noise_kind": "symmetric"},
        "model": {"name": "cnn_digits", "hidden": [256, 256]},
        "method": None if method is None else {"name": method, "sam": method == "sam", "rho": None, "adaptive": False},
        "optimizer": {"name": "sgd", "lr": lr},
        "eval": {"name": "quick", "n_examples": None, "batch_size": 500, "seed": 0, "checkpoint": checkpoint,
                 "evaluators": [{"name": "clean"}, {"name": "pgd", "steps": pgd_steps, "restarts": 1}]},
        "logger": {"name": "none"},
        "ckpt": None,
    }


def write_configured_run(root, name, method, seed, metrics, mtime=None, evaluated="last", trained=None, **cfg):
    """A results.json with config, train and eval sections like robust-train's."""
    path = write_run(root, name, method, seed, metrics, mtime=mtime)
    results = json.loads(path.read_text())
    results["config"] = config(method=None if method == "erm" and cfg.pop("plain", False) else method,
                               seed=seed, **cfg)
    epochs = results["config"]["train"]["epochs"]
    results["train"] = {"epochs": epochs, "epochs_trained": trained or epochs, "checkpoint": evaluated,
                        "checkpoint_epoch": trained or epochs}
    steps = results["config"]["eval"]["evaluators"][1]["steps"]
    results["eval"] = {
        "clean/acc": {"n_examples": 360},
        "pgd/acc": {"attack": "pgd", "norm": "linf", "eps": 0.1, "eps_255": 25.5, "steps": steps, "restarts": 1,
                    "n_examples": 360, "seed": 0},
        "autoattack/acc": {"attack": "autoattack", "version": "standard", "norm": "linf", "eps": 0.1,
                           "eps_255": 25.5, "steps": "100 (APGD, FAB); Square 5000 queries", "restarts": 1,
                           "n_examples": 360, "seed": 0},
    }
    path.write_text(json.dumps(results))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_runs_whose_settings_differ_are_never_pooled(summarize, tmp_path, capsys):
    # seeds 0 and 1 of one setting; seed 0 of another (more epochs, lower lr, PGD-5): the old label
    # ("erm") averaged all three and called the two seed-0 runs duplicates
    write_configured_run(tmp_path, "a0", "erm", 0, {"clean/acc": 0.90, "pgd/acc": 0.5}, plain=True)
    write_configured_run(tmp_path, "a1", "erm", 1, {"clean/acc": 0.92, "pgd/acc": 0.6}, device="cpu")
    write_configured_run(tmp_path, "b0", "erm", 0, {"clean/acc": 0.80, "pgd/acc": 0.9}, epochs=4, lr=0.02,
                         pgd_steps=5)
    write_configured_run(tmp_path, "at0", "at", 0, {"clean/acc": 0.85, "pgd/acc": 0.8})
    assert summarize.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "summary.csv")
    first = "erm train.epochs=2 optimizer.lr=0.1 eval.evaluators[pgd].steps=50"
    second = "erm train.epochs=4 optimizer.lr=0.02 eval.evaluators[pgd].steps=5"
    assert set(rows) == {"at", first, second}
    # no +method (method: null) and +method=erm are the same training; device cannot change a number
    assert rows[first]["n_seeds"] == "2" and rows[second]["n_seeds"] == "1"
    assert float(rows[second]["pgd/acc_mean"]) == pytest.approx(0.9)
    table = (tmp_path / "summary.md").read_text()
    assert "using the newest" not in table and "`train.epochs`, `optimizer.lr`" in table


def test_the_same_run_twice_is_a_duplicate_only_with_the_same_settings(summarize, tmp_path):
    write_configured_run(tmp_path, "run", "erm", 0, {"clean/acc": 0.9, "pgd/acc": 0.5}, mtime=1_000)
    write_configured_run(tmp_path, "again", "erm", 0, {"clean/acc": 0.9, "pgd/acc": 0.4}, mtime=2_000)
    write_configured_run(tmp_path, "best", "erm", 0, {"clean/acc": 0.9, "pgd/acc": 0.7}, evaluated="best",
                         checkpoint="best")
    assert summarize.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "summary.csv")
    assert set(rows) == {"erm eval.checkpoint=last", "erm eval.checkpoint=best"}
    assert float(rows["erm eval.checkpoint=last"]["pgd/acc_mean"]) == pytest.approx(0.4)  # the newest
    assert "using the newest" in (tmp_path / "summary.md").read_text()


def test_paired_only_within_the_same_settings_and_says_what_differs(summarize, tmp_path, capsys):
    for seed in range(2):
        write_configured_run(tmp_path, f"erm{seed}", "erm", seed, {"clean/acc": 0.9})
        write_configured_run(tmp_path, f"sam{seed}", "sam", seed, {"clean/acc": 0.92})
        # AT evaluates best.pt by default (eval.checkpoint=auto): paired, and the column says so
        write_configured_run(tmp_path, f"at{seed}", "at", seed, {"clean/acc": 0.8}, evaluated="best")
        write_configured_run(tmp_path, f"trades{seed}", "trades", seed, {"clean/acc": 0.7}, epochs=3)
    assert summarize.main([str(tmp_path), "--paired", "erm"]) == 0
    with (tmp_path / "paired.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"sam", "at"}  # TRADES trained 3 epochs, ERM 2: not a paired comparison
    assert rows["sam"]["baseline"] == "erm" and rows["sam"]["differs"] == ""
    assert rows["at"]["differs"] == "eval.checkpoint best vs last"
    paired = (tmp_path / "paired.md").read_text()
    assert "trades: not paired" in paired and "Settings:" in paired


def test_ibp_pairs_across_its_recipe_keys(summarize, tmp_path):
    write_configured_run(tmp_path, "erm", "erm", 0, {"clean/acc": 0.9})
    write_configured_run(tmp_path, "ibp", "ibp", 0, {"clean/acc": 0.95}, epochs=100, lr=0.005)
    assert summarize.main([str(tmp_path), "--paired", "erm"]) == 0
    with (tmp_path / "paired.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["method"] == "ibp" and "train.epochs 100 vs 2" in row["differs"]
    assert "optimizer.lr 0.005 vs 0.1" in row["differs"]


def test_tables_carry_the_settings_behind_every_column(summarize, tmp_path, capsys):
    sweep = tmp_path / "deep" / "my-sweep"
    for seed, (clean, aa) in enumerate(((0.96, 0.40), (0.98, 0.42))):
        write_configured_run(sweep, f"erm{seed}", "erm", seed, {"clean/acc": clean, "pgd/acc": 0.5,
                                                                "autoattack/acc": aa}, trained=2 + seed)
    write_configured_run(sweep, "at", "at", 0, {"clean/acc": 0.9, "pgd/acc": 0.8}, pgd_steps=10)
    assert summarize.main([str(sweep)]) == 0
    table = (sweep / "summary.md").read_text()
    assert table.startswith("# Summary of my-sweep\n")  # the directory's name, not its absolute path
    assert "- `autoattack/acc`: AutoAttack version standard, linf eps 0.1 = 25.5/255" in table
    assert "n=360, eval seed 0" in table
    assert "- `pgd/acc`: **differs between runs**" in table and "10 steps" in table and "50 steps" in table
    assert "last.pt at epochs 2–3 (erm)" in table
    assert "- epochs trained: **differs between runs**: 2 (at); 2–3 (erm)" in table
    tex = (sweep / "summary.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "Clean (\\%)" in tex and "AutoAttack (\\%)" in tex
    assert "& PGD (\\%)" in tex  # 50 steps for ERM, 10 for AT: the head does not pick one (comments list both)
    assert "$\\ell_\\infty$, $\\epsilon = 0.1$ ($= 25.5/255$)" in tex
    assert f"${97.0:.2f} \\pm {100 * statistics.stdev([0.96, 0.98]):.2f}$" in tex
    assert "& $90.00$ &" in tex  # one seed: no ±


def test_tradeoff_names_the_groups_it_leaves_out(summarize, tmp_path, capsys):
    write_configured_run(tmp_path, "erm", "erm", 0, {"clean/acc": 0.9, "pgd/acc": 0.5, "autoattack/acc": 0.4})
    write_configured_run(tmp_path, "at", "at", 0, {"clean/acc": 0.8, "pgd/acc": 0.7})
    assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "robust = autoattack/acc" in printed
    assert "tradeoff.png leaves out 1 group(s) without clean/acc or autoattack/acc: at" in printed
    runs, _ = load_runs(tmp_path)
    label = robust_axis_label("autoattack/acc", [r for r in runs if "autoattack/acc" in r["metrics"]])
    assert label == "AutoAttack accuracy (%), linf eps 0.1 = 25.5/255"


def test_a_running_job_is_named(summarize, tmp_path, capsys):
    write_run(tmp_path, "done", "erm", 0, {"clean/acc": 0.9})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "status.json").write_text(json.dumps({"status": "running", "time": 1}))
    (tmp_path / "broke").mkdir()
    (tmp_path / "broke" / "status.json").write_text(json.dumps({"status": "failed", "error": "ValueError: x"}))
    assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'busy'} is still running (no results.json yet)" in printed
    assert f"{tmp_path / 'broke'} has no results.json (status failed: ValueError: x)" in printed


def test_the_package_imports_without_matplotlib():
    # the plot imports matplotlib only when it draws: `import runner` and the summary modules stay light
    code = "import sys, runner.summary.cli; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_killed_run_is_told_from_a_running_one_by_its_lock(summarize, tmp_path, capsys):
    import fcntl

    write_run(tmp_path, "done", "erm", 0, {"clean/acc": 0.9})
    for name in ("alive", "dead"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps({"status": "running", "time": 1}))
        (tmp_path / name / ".lock").write_text("12345")
    with open(tmp_path / "alive" / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a live robust-train holds; SIGKILL releases it
        assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'alive'} is still running" in printed
    assert f"{tmp_path / 'dead'} was killed while running" in printed and "run its command again" in printed


def test_an_unwritable_output_directory_is_one_line_after_the_table(summarize, tmp_path, capsys):
    write_run(tmp_path, "r", "erm", 0, {"clean/acc": 0.9})
    (tmp_path / "file.txt").write_text("")
    assert summarize.main([str(tmp_path), "--out", str(tmp_path / "file.txt" / "tables")]) == 1
    captured = capsys.readouterr()
    assert "| erm |" in captured.out  # the table is printed all the same
    assert captured.err.count("\n") == 1 and "cannot write the tables" in captured.err and "--out" in captured.err


def test_a_checkpoint_of_unfinished_training_is_noted(tmp_path):
    path = write_run(tmp_path, "eval", "at", 0, {"clean/acc": 0.9})
    results = json.loads(path.read_text())
    results["train"] = {"epochs": 6, "checkpoint_epoch": 2, "training_status": "killed"}
    path.write_text(json.dumps(results))
    _, notes = load_runs(tmp_path)
    assert notes == [f"{tmp_path / 'eval'}: evaluates a checkpoint of an unfinished training run (its status: "
                     "killed, checkpoint epoch 2 of 6)"]


def test_tex_column_heads_name_the_attack_a_paper_would():
    from runner.summary.tables import column_title

    assert column_title("pgd/acc", {"steps": 50, "restarts": 1}) == "PGD-50"
    assert column_title("pgd/acc", {"steps": 20, "restarts": 5}) == "PGD-20$\\times$5"
    assert column_title("pgd/eps_0.05/acc", {"steps": 50, "eps": 0.05}) == "PGD-50 ($\\epsilon$=0.05)"
    assert column_title("pgd/l2/eps_0.5/acc", {"steps": 50, "eps": 0.5}) == "PGD-50 ($\\ell_2$, $\\epsilon$=0.5)"
    assert column_title("certified/ibp/acc", None) == "IBP cert." and column_title("clean/acc", {}) == "Clean"
    assert column_title("my_metric/acc", None) == "my\\_metric/acc"


def test_labels_name_the_suite_not_its_evaluators_when_suites_differ():
    from runner.summary.groups import group_runs

    def run(seed, suite, steps):
        settings = {"method.name": "erm", "eval.name": suite, "eval.evaluators[pgd]": "on",
                    "eval.evaluators[pgd].steps": steps}
        return {"run": {"method": "erm", "seed": seed}, "settings": settings, "mtime": seed, "path": f"{suite}{seed}"}

    groups, _, notes = group_runs([run(0, "quick", 50), run(0, "full", 100)])
    assert sorted(groups) == ["erm eval.name=full", "erm eval.name=quick"]
    assert "eval.evaluators[pgd].steps" in notes[0]  # the notes still list every key that differs
    groups, _, _ = group_runs([run(0, "quick", 50), run(0, "quick", 10), run(0, "full", 100)])
    assert len(groups) == 3 and all("#" not in label for label in groups)  # then the evaluators are named


def test_the_caption_names_the_threat_the_numbers_were_measured_at(summarize, tmp_path):
    path = write_run(tmp_path, "eval", "at", 0, {"clean/acc": 0.9, "pgd/acc": 0.7})  # trained at 0.1
    results = json.loads(path.read_text())
    results["eval_threat"] = {"norm": "linf", "eps": 0.05}  # robust-eval ... threat.eps=0.05
    path.write_text(json.dumps(results))
    assert summarize.main([str(tmp_path)]) == 0
    assert "$\\epsilon = 0.05$" in (tmp_path / "summary.tex").read_text()
