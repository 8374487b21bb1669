"""The trainer's results files and printed table, with and without per-user ranks."""

from __future__ import annotations

import json

import pytest

from recipes import results

AFTER = {"valid/hit@5": 0.5, "valid/ndcg@20": 0.25, "valid/mean_rank": 3.0, "index/mean_cosine": 0.9}
BEFORE = {"valid/hit@5": 0.0, "valid/ndcg@20": 0.0, "valid/mean_rank": 40.0}
# Users 3 and 8 of the valid split: ranks 40, 40 before training and 1, 5 after.
PER_USER_BEFORE = {"valid": {"sample_index": [3, 8], "rank": [40, 40]}}
PER_USER_AFTER = {"valid": {"sample_index": [3, 8], "rank": [1, 5]}}


def test_write_results_without_per_user_keeps_the_old_shape(tmp_path):
    written = results.write_results(str(tmp_path), AFTER, BEFORE)
    assert written == {"valid": {"hit@5": 0.5, "ndcg@20": 0.25}}
    assert json.loads((tmp_path / "results.json").read_text()) == written
    assert json.loads((tmp_path / "results_before.json").read_text()) == {
        "valid": {"hit@5": 0.0, "ndcg@20": 0.0}
    }


def test_write_results_adds_per_user_ranks_to_both_files(tmp_path):
    written = results.write_results(str(tmp_path), AFTER, BEFORE, PER_USER_AFTER, PER_USER_BEFORE)
    assert written["per_user"] == PER_USER_AFTER and written["valid"]["hit@5"] == 0.5
    assert json.loads((tmp_path / "results.json").read_text()) == written
    before = json.loads((tmp_path / "results_before.json").read_text())
    assert before["per_user"] == PER_USER_BEFORE


def test_write_results_rejects_a_malformed_per_user_record(tmp_path):
    with pytest.raises(ValueError, match=r"per_user\.valid: 'sample_index' has 1 entries but 'rank' has 2"):
        results.write_results(
            str(tmp_path), AFTER, per_user_after={"valid": {"sample_index": [0], "rank": [1, 2]}}
        )


def test_format_table_without_per_user_is_the_old_table():
    table = results.format_table(AFTER, BEFORE)
    assert table.splitlines()[1].split() == ["valid", "before", "0.0000", *["0.0000"] * 5, "40.0"]
    assert "bootstrap" not in table


def test_format_table_shows_intervals_and_the_paired_change_after_minus_before():
    table = results.format_table(AFTER, BEFORE, PER_USER_AFTER, PER_USER_BEFORE)
    assert "95% percentile bootstrap intervals" in table
    # after: hit@5 is 1 then 1 -> every resample 1.0; before: 0 -> 0.0
    assert "valid   hit@5      0.0000 [0.0000, 0.0000]   1.0000 [1.0000, 1.0000]" in table
    rank_row = next(line for line in table.splitlines() if "mean rank" in line)
    assert rank_row.startswith("valid   mean rank  40.0 [40.0, 40.0]") and "3.0 [1.0, 5.0]" in rank_row
    paired = next(line for line in table.splitlines() if "after - before" in line)
    # rank changes -39 and -35: the paired mean is -37, every resample between -39 and -35
    assert "paired on 2 users" in paired and "mean_rank -37.0 [-39.0, -35.0] (excludes 0)" in paired


def test_format_table_says_when_before_and_after_share_no_user():
    other_users = {"valid": {"sample_index": [4, 9], "rank": [40, 40]}}
    table = results.format_table(AFTER, BEFORE, PER_USER_AFTER, other_users)
    assert "after - before: no user in common" in table
