"""The report builder on small fake results and trainer logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes import report
from rewards.ranking import ranking_metrics

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
    assert (out / "final_metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_a_report_of_result_files_only_draws_no_empty_training_curves(runs, tmp_path, capsys):
    out = tmp_path / "r"
    report.main([*run_args(runs), "--out", str(out)])  # recpo has training logs: curves, linked
    assert (out / "training_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "training_curves.png" in capsys.readouterr().out
    # The same folder again with result files only: no figure of empty panels, none left from before, no link.
    text = report.main([*run_args(runs[:2]), "--out", str(out)]).read_text()
    assert not (out / "training_curves.png").exists()
    assert "training_curves.png" not in text and "no training curves" in text
    assert "training_curves.png" not in capsys.readouterr().out
    assert (out / "final_metrics.png").read_bytes().startswith(PNG_MAGIC)


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


# ---------------------------------------------------------------- per-user ranks: intervals and pairing


def per_user(indices: list[int], ranks: list[int]) -> dict:
    return {"sample_index": indices, "rank": ranks}


def scored(indices: list[int], ranks: list[int]) -> dict:
    """A results file as the tools write it: the metrics of the ranks on test, and the ranks themselves."""
    return {"test": ranking_metrics(torch.tensor(ranks)), "per_user": {"test": per_user(indices, ranks)}}


@pytest.fixture
def paired_runs(tmp_path):
    """popularity ranks every target 30th on test rows 0-9; recpo ranks it 1st on rows 2-11 (8 shared);
    recpo's untrained model ranked rows 2-11 at 40; sasrec's file predates per-user ranks."""
    pop, sas = tmp_path / "popularity.json", tmp_path / "sasrec.json"
    pop.write_text(json.dumps(scored(list(range(10)), [30] * 10)))
    sas.write_text(json.dumps({"test": metrics(2.0)}))
    recpo = tmp_path / "recpo"
    recpo.mkdir()
    rows = list(range(2, 12))
    (recpo / "results.json").write_text(json.dumps(scored(rows, [1] * 10)))
    (recpo / "results_before.json").write_text(json.dumps(scored(rows, [40] * 10)))
    return [f"popularity={pop}", f"sasrec={sas}", f"recpo={recpo}"]


def test_report_shows_intervals_and_mean_rank_for_runs_with_per_user_ranks(paired_runs, tmp_path):
    text = report.main([*run_args(paired_runs), "--out", str(tmp_path / "r")]).read_text()
    assert "| run | hit@5 | hit@10 | hit@20 | ndcg@5 | ndcg@10 | ndcg@20 | mean rank |" in text
    # every popularity user at rank 30: hit@20 is 0 and the mean rank 30 in every resample
    assert "| popularity | 0.0000 [0.0000, 0.0000] |" in text and "| 30.0 [30.0, 30.0] |" in text
    assert "| sasrec | 0.2000 | 0.4000 | 0.6000 | 0.1000 | 0.1600 | 0.2000 | – |" in text  # no ranks
    assert "| recpo | **1.0000** [1.0000, 1.0000] |" in text
    assert "| **1.0** [1.0, 1.0] |" in text  # recpo's mean rank, the lowest, in bold


def test_report_interval_is_centred_on_the_per_user_mean():
    ranks = [1, 30, 1, 30]  # hit@5 0.5 on these users; the file claims 0.9
    run = report.Run(
        "x", Path("x.json"), {"test": {"hit@5": 0.9}}, per_user={"test": per_user([0, 1, 2, 3], ranks)}
    )
    row = report.results_table([run], "test", ["hit@5"], report.run_intervals([run]))[2]
    assert row.startswith("| x | **0.5000** [") and "0.9000" not in row


def test_report_pairs_the_main_run_with_each_run_on_their_shared_users(paired_runs, tmp_path):
    text = report.main([*run_args(paired_runs), "--out", str(tmp_path / "r")]).read_text()
    section = text.split("## Paired comparison on the same users")[1]
    assert "| split | comparison | users | mean rank | hit@20 | ndcg@10 | ndcg@20 |" in section
    # rows 2-9 are shared; recpo - popularity: rank 1 - 30 = -29, hit@20 1 - 0 = +1, every user alike
    assert (
        "| test | recpo - popularity | 8 | **-29.0 [-29.0, -29.0]** | **+1.0000 [+1.0000, +1.0000]** |"
        in section
    )
    assert "sasrec on test: no per-user ranks, not compared" in section


def test_report_adds_the_main_runs_paired_change_before_to_after(paired_runs, tmp_path):
    text = report.main([*run_args(paired_runs), "--out", str(tmp_path / "r")]).read_text()
    assert "| test | recpo after - before | 10 | **-39.0 [-39.0, -39.0]** |" in text


def test_report_keeps_the_relative_improvement_table_beside_the_paired_one(paired_runs, tmp_path):
    text = report.main([*run_args(paired_runs), "--out", str(tmp_path / "r")]).read_text()
    assert "| test | hit@5 | sasrec | 0.2000 | 1.0000 | +400.00% |" in text  # recpo's hit@5 is 1


def test_report_of_old_files_says_there_is_no_paired_comparison(runs, tmp_path):
    text = report.main([*run_args(runs), "--out", str(tmp_path / "r")]).read_text()
    tables = text.split("## Paired comparison on the same users")[0]
    assert "mean rank" not in tables and " [" not in tables  # values only, as before per-user ranks
    assert "`recpo` has no per-user ranks" in text


def test_runs_with_no_shared_user_are_noted_not_compared(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"test": metrics(1.0), "per_user": {"test": per_user([0, 1], [3, 4])}}))
    b.write_text(json.dumps({"test": metrics(2.0), "per_user": {"test": per_user([5, 6], [1, 2])}}))
    text = report.main(
        ["--run", f"recpo={a}", "--run", f"other={b}", "--out", str(tmp_path / "r")]
    ).read_text()
    assert "other on test: no user in common with recpo" in text


def test_malformed_per_user_is_an_error_naming_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"test": metrics(1.0), "per_user": {"test": per_user([0, 1], [1, 0])}}))
    with pytest.raises(SystemExit, match=r"bad\.json: per_user\.test\.rank\[1\]: ranks are 1-based"):
        report.main(["--run", f"x={bad}", "--out", str(tmp_path / "r")])
