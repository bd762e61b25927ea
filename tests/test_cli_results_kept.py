"""A finished run evaluated again (another eval suite: the same run directory) keeps the earlier results."""

from runner.tracking import keep_earlier_results


def test_earlier_results_report_and_plots_are_kept(tmp_path):
    (tmp_path / "results.json").write_text('{"suite": "quick"}')
    (tmp_path / "report.md").write_text("![curve](robustness_curve.png)")
    (tmp_path / "robustness_curve.png").write_bytes(b"png")
    (tmp_path / "train.log").write_text("log")
    said = []
    earlier = keep_earlier_results(tmp_path, said.append)
    assert earlier.parent == tmp_path / "earlier"
    assert (earlier / "results.json").read_text() == '{"suite": "quick"}'
    assert (earlier / "report.md").exists() and (earlier / "robustness_curve.png").exists()
    assert not (tmp_path / "results.json").exists() and (tmp_path / "train.log").exists()
    assert len(said) == 1 and str(earlier) in said[0]
    (tmp_path / "results.json").write_text('{"suite": "full"}')  # a third evaluation, written in the same second
    again = keep_earlier_results(tmp_path)
    assert again != earlier and (again / "results.json").read_text() == '{"suite": "full"}'


def test_nothing_to_keep_on_a_first_evaluation(tmp_path):
    assert keep_earlier_results(tmp_path) is None
    assert not (tmp_path / "earlier").exists()


def test_the_same_finished_command_again_is_complete_and_another_suite_evaluates_again(tmp_path):
    import runner.train
    from runner.config import compose

    base = ["model=mlp", "model.hidden=[8]", "train.epochs=1", "eval.evaluators=[{name: clean}]"]
    first = runner.train.run(compose(base), tmp_path)
    again = runner.train.run(compose([*base, "train.log_every=7"]), tmp_path)  # changes no number
    assert again == first and not (tmp_path / "earlier").exists()
    assert "already complete" in (tmp_path / "train.log").read_text()
    other = runner.train.run(compose([*base[:-1], "eval.evaluators=[{name: clean}, {name: pgd, steps: 2}]"]),
                             tmp_path)
    assert "pgd/acc" in other["metrics"] and len(list((tmp_path / "earlier").iterdir())) == 1


def test_results_written_before_they_carried_the_config_are_evaluated_again(tmp_path):
    import json

    from runner.train import completed_results

    (tmp_path / "status.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "results.json").write_text(json.dumps({"train": {"epochs_trained": 1, "steps": 5}}))
    assert completed_results(tmp_path, {"seed": 0}, {"epoch": 1, "step": 5, "batch": 0}) is None
