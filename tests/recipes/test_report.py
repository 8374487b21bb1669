"""The report builder on small fake results and trainer logs."""

from __future__ import annotations

import json

import pytest

from recipes import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(scale: float) -> dict[str, float]:
    base = {"hit@5": 0.1, "hit@10": 0.2, "hit@20": 0.3, "ndcg@5": 0.05, "ndcg@10": 0.08, "ndcg@20": 0.1}
    return {k: v * scale for k, v in base.items()}


@pytest.fixture
def runs(tmp_path):
    """popularity (x1) and sasrec (x2) as results files, recpo (x3) as a training folder with logs."""
    pop, sas = tmp_path / "popularity.json", tmp_path / "sasrec.json"
    pop.write_text(json.dumps({"valid": metrics(1.0), "test": metrics(1.0)}))
    sas.write_text(json.dumps({"valid": metrics(2.0), "test": metrics(2.0)}))
    recpo = tmp_path / "recpo"
    recpo.mkdir()
    (recpo / "results.json").write_text(json.dumps({"valid": metrics(3.0), "test": metrics(3.0)}))
    log = [
        {
            "step": s,
            "reward": 0.1 * s,
            "rewards/ndcg/mean": 0.05 * s,
            "completions/mean_length": 60 + s,
            "loss": 0.0,
        }
        for s in range(1, 5)
    ]
    log += [
        {"step": 2, "valid/hit@5": 0.2, "valid/ndcg@10": 0.1},
        {"step": 4, "valid/hit@5": 0.3, "valid/ndcg@10": 0.2},
    ]
    (recpo / "trainer_state.json").write_text(json.dumps({"log_history": log, "global_step": 4}))
    return [f"popularity={pop}", f"sasrec={sas}", f"recpo={recpo}"]


def run_args(runs: list[str]) -> list[str]:
    return [arg for spec in runs for arg in ("--run", spec)]


def test_report_table_has_every_run_and_relative_improvement_over_best_baseline(runs, tmp_path):
    out = tmp_path / "report"
    text = report.main([*run_args(runs), "--out", str(out)]).read_text()
    assert "| popularity | 0.1000 | 0.2000 | 0.3000 | 0.0500 | 0.0800 | 0.1000 |" in text
    assert "| sasrec | 0.2000 | 0.4000 |" in text
    assert "| recpo | **0.3000** | **0.6000** |" in text
    # recpo 0.3 vs the best baseline sasrec 0.2 on hit@5: +50%; ndcg@20 0.3 vs 0.2: +50% as well
    assert "| test | hit@5 | sasrec | 0.2000 | 0.3000 | +50.00% |" in text
    assert "| valid | ndcg@20 | sasrec | 0.2000 | 0.3000 | +50.00% |" in text


def test_report_writes_both_pngs(runs, tmp_path):
    out = tmp_path / "report"
    report.main([*run_args(runs), "--out", str(out)])
    for name in ("training_curves.png", "final_metrics.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_report_main_option_picks_the_compared_run(runs, tmp_path):
    text = report.main([*run_args(runs), "--out", str(tmp_path / "r"), "--main", "sasrec"]).read_text()
    # sasrec 0.4 vs the best other run recpo 0.6 on hit@10: -33.33%
    assert "| valid | hit@10 | recpo | 0.6000 | 0.4000 | -33.33% |" in text


def test_report_without_main_run_still_writes_tables_and_plots(runs, tmp_path):
    out = tmp_path / "r"
    text = report.main([*run_args(runs[:2]), "--out", str(out)]).read_text()
    assert "No run is named 'recpo'" in text and "| sasrec |" in text
    assert (out / "training_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_zero_baseline_gives_no_relative_improvement():
    assert report.relative_improvement(0.5, 0.0) is None
    assert report.relative_improvement(0.3, 0.2) == pytest.approx(0.5)


def test_curve_reads_logged_steps_and_skips_entries_without_the_key():
    history = [{"step": 1, "reward": 0.5}, {"step": 2, "loss": 1.0}, {"step": 3, "eval_valid/hit@5": 0.2}]
    assert report.curve(history, "reward") == ([1.0], [0.5])
    assert report.curve(history, "valid/hit@5") == ([3.0], [0.2])


def test_curve_reads_the_evaluations_before_and_after_training():
    history = [
        {"step": 0, "before/valid/hit@5": 0.0},
        {"step": 4, "reward": 0.1},
        {"step": 9, "final/valid/hit@5": 0.04, "final/test/hit@5": 0.02},
    ]
    assert report.curve(history, "valid/hit@5") == ([0.0, 9.0], [0.0, 0.04])


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="nope.json does not exist"):
        report.main(["--run", f"x={tmp_path / 'nope.json'}", "--out", str(tmp_path / "r")])


def test_invalid_json_is_an_error_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"valid": {"hit@5": 0.1,}\n}')
    with pytest.raises(SystemExit, match=r"bad\.json: invalid JSON at line 1"):
        report.main(["--run", f"x={bad}", "--out", str(tmp_path / "r")])


def test_wrong_results_shape_is_an_error_naming_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"test": {"hit@5": "high"}}))
    with pytest.raises(SystemExit, match=r"bad\.json: 'test.hit@5' must be a number"):
        report.main(["--run", f"x={bad}", "--out", str(tmp_path / "r")])


def test_training_folder_without_results_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="has no results.json"):
        report.main(["--run", f"x={tmp_path / 'run'}", "--out", str(tmp_path / "r")])


def test_run_spec_without_name_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        report.main(["--run", str(tmp_path), "--out", str(tmp_path / "r")])


def test_unknown_main_run_is_an_error(runs, tmp_path):
    with pytest.raises(SystemExit, match="--main typo: no run of that name"):
        report.main([*run_args(runs), "--out", str(tmp_path / "r"), "--main", "typo"])


def test_trainer_state_falls_back_to_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (5, 10):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"log_history": [{"step": step}]})
        )
    (run / "results.json").write_text(json.dumps({"test": metrics(1.0)}))
    assert report.load_run("x", run).log_history == [{"step": 10}]
