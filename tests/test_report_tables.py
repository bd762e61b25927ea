"""report.md's tables paste into a paper: rows grouped by evaluator, settings shared by a group shown once,
no cell cut mid-token, no absolute paths, eps·255 rounded, the corruption breakdown as one matrix; and
robustness_curve.png draws a metric measured at one eps as a marker with its attack's settings named."""

import re

import pytest

import runner.report as report_module
from runner import plots


def _acc(value: float, **settings) -> tuple[float, dict]:
    return value, {"n_examples": 100, "ci95": [max(0.0, value - 0.05), min(1.0, value + 0.05)],
                   "ci95_method": "Wilson score interval", "seed": 0, **settings}


def _results(run_dir) -> dict:
    pgd = {"evaluator": "pgd", "attack": "pgd", "norm": "linf", "steps": 50, "restarts": 1, "loss": "ce"}
    entries = {
        "clean/acc": _acc(0.95, evaluator="clean"),
        "pgd/eps_0.025/acc": _acc(0.9, eps=0.025, eps_255=6.375, alpha=0.00125, **pgd),
        "pgd/acc": _acc(0.7, eps=0.1, eps_255=25.5, alpha=0.005, **pgd),
        "pgd/eps_0.2/acc": _acc(0.3, eps=0.2, eps_255=51.0, alpha=0.01, **pgd),
        "autoattack/acc": _acc(0.65, evaluator="autoattack", attack="autoattack", version="standard",
                               norm="linf", eps=0.1, eps_255=25.5,
                               state_file=str(run_dir / "autoattack" / "autoattack.json"),
                               attack_settings={"apgd-ce": {"n_iter": 100, "eot_iter": 1, "rho": 0.75,
                                                            "loss": "ce", "restarts": 1}}),
        "certified/ibp/acc": _acc(0.2, evaluator="certified", verifier="ibp", norm="linf", eps=0.1),
        "certified/crown_ibp/acc": _acc(0.25, evaluator="certified", verifier="crown_ibp", norm="linf", eps=0.1),
        "certified/acc": _acc(0.25, evaluator="certified", verifier="union", norm="linf", eps=0.1,
                              methods=["ibp", "crown_ibp", "crown"]),
    }
    provenance = "CIFAR-10-C (Hendrycks & Dietterich 2019, make_cifar_c.py); frost texture synthesised"
    common = {"evaluator": "corruptions", "regenerated": True, "constants": provenance, "seed": 0}
    for name in ("gaussian_noise", "fog"):
        for severity in (1, 2, 3):
            entries[f"corruption/{name}/sev{severity}/acc"] = _acc(0.9 - 0.01 * severity, corruption=name,
                                                                  severity=severity, **common)
        entries[f"corruption/{name}/acc"] = _acc(0.88, corruption=name, severities=[1, 2, 3], **common)
    entries["corruption/mean_acc"] = _acc(0.88, corruptions=["gaussian_noise", "fog"], **common)
    # The order an older suite produced: per-eps PGD rows after the certified ones.
    order = ["clean/acc", "pgd/acc", "autoattack/acc", "certified/ibp/acc", "corruption/mean_acc",
             "pgd/eps_0.025/acc", "pgd/eps_0.2/acc", "certified/crown_ibp/acc", "certified/acc"]
    order += [k for k in entries if k not in order]
    return {"metrics": {k: entries[k][0] for k in order}, "eval": {k: entries[k][1] for k in order},
            "checks": [], "skipped": []}


@pytest.fixture
def report(tmp_path, compose_cfg):
    out = _results(tmp_path)
    report_module.write_report(tmp_path, out, compose_cfg("+method=at"), "best.pt, epoch 3")
    return (tmp_path / "report.md").read_text()


def test_rows_are_grouped_by_evaluator_in_order(tmp_path):
    out = _results(tmp_path)
    headline, details = report_module.ordered_keys(out["metrics"], out["eval"])
    assert headline[:4] == ["clean/acc", "pgd/eps_0.025/acc", "pgd/acc", "pgd/eps_0.2/acc"]
    assert headline.index("certified/crown_ibp/acc") < headline.index("corruption/mean_acc")
    assert headline.index("certified/ibp/acc") < headline.index("certified/crown_ibp/acc") < headline.index(
        "certified/acc")
    assert all(k.startswith("corruption/") for k in details)


def test_tables_paste_cleanly(report, tmp_path):
    assert "…" not in report  # nothing cut mid-token
    assert str(tmp_path) not in report  # no absolute paths in cells
    assert "state_file=autoattack/autoattack.json" in report
    assert "eot_iter=1" in report
    assert "6.375" not in report and "| 6.4 |" in report  # eps·255 rounded
    # The corruption provenance appears once per evaluator, not once per condition.
    assert report.count("Hendrycks & Dietterich") <= 2
    # Settings a group shares are shown once above its table, not in every row.
    pgd_section = report.split("### pgd")[1].split("###")[0]
    assert pgd_section.count("steps=50") == 1 and "| eps |" in pgd_section
    # The corruption breakdown: one row per corruption, one column per severity.
    assert re.search(r"\| corruption \| sev 1 \| sev 2 \| sev 3 \| mean \| 95% CI \|", report)
    assert re.search(r"\| gaussian_noise \| 0\.8900 \| 0\.8800 \| 0\.8700 \| 0\.8800 \|", report)


def test_curve_draws_single_eps_metrics_as_markers_with_named_settings(tmp_path, monkeypatch):
    out = _results(tmp_path)
    drawn = []
    from matplotlib.axes import Axes

    original = Axes.errorbar

    def record(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x), kwargs.get("fmt")))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    path = plots.write_curve(tmp_path, out["metrics"], out["eval"], 0.1, "at, seed 1, best.pt (epoch 3)")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    by_label = {label: (x, fmt) for label, x, fmt in drawn}
    assert by_label["PGD-50"] == ([0.0, 0.025, 0.1, 0.2], "o-")  # a curve from the clean point
    x, fmt = by_label["AutoAttack (standard)"]
    assert x == [0.1] and "-" not in fmt  # one eps: a marker, no line from the clean point
    assert "certified (union of IBP, CROWN-IBP, CROWN)" in by_label
    assert "-" not in by_label["certified (union of IBP, CROWN-IBP, CROWN)"][1]


def test_attack_labels_carry_their_settings():
    assert plots.attack_label("pgd", {"steps": 10, "restarts": 3}) == "PGD-10 x 3 restarts"
    assert plots.attack_label("autoattack", {"version": "rand"}) == "AutoAttack (rand)"
    assert plots.attack_label("certified/ibp", {"verifier": "ibp"}) == "certified (IBP)"
    curves = plots.curve_points({"certified/acc": 0.3}, {"certified/acc": {"eps": 0.1, "norm": "l2"}})
    assert list(curves) == ["l2"]


def test_skipped_evaluators_are_not_counted_as_passed_checks():
    from runner.report_header import checks_line

    checks = [{"name": "pgd <= clean per point", "passed": True},
              {"name": "certified applicable", "passed": True, "skipped": True, "detail": "skipped: l2"},
              {"name": "x", "passed": False}]
    assert checks_line(checks) == "- checks: 1 of 2 passed; 1 not run (marked skip: not applicable or an input missing)"
