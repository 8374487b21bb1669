"""Bootstrap intervals of the ranking metrics: hand-checkable cases, pairing, seeding, coverage, records."""

from __future__ import annotations

import pytest
import torch

from recipes import intervals
from recipes.intervals import Interval


def test_per_user_values_follow_the_shared_metric_definitions():
    values = intervals.per_user_values([1, 3, 7, 30])
    assert list(values) == intervals.metric_names()
    assert values["hit@5"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert values["hit@20"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert values["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])
    assert values["mean_rank"].tolist() == [1.0, 3.0, 7.0, 30.0]


def test_all_users_at_rank_one_give_degenerate_intervals_at_one():
    result = intervals.bootstrap_intervals([1] * 50, resamples=200)
    assert result["hit@5"] == Interval(1.0, 1.0, 1.0)
    assert result["ndcg@20"] == Interval(1.0, 1.0, 1.0)
    assert result["mean_rank"] == Interval(1.0, 1.0, 1.0)


def test_interval_value_is_the_plain_mean_and_lies_inside_the_interval():
    ranks = [1, 2, 4, 8, 16, 32, 64, 128]
    result = intervals.bootstrap_intervals(ranks, resamples=500)
    assert result["hit@5"].value == pytest.approx(3 / 8)
    assert result["mean_rank"].value == pytest.approx(sum(ranks) / 8)
    for interval in result.values():
        assert interval.low <= interval.value <= interval.high


def test_same_seed_gives_the_same_intervals_and_another_seed_differs():
    ranks = torch.randint(1, 100, (300,), generator=torch.Generator().manual_seed(1))
    first = intervals.bootstrap_intervals(ranks, seed=3)
    assert intervals.bootstrap_intervals(ranks, seed=3) == first
    assert intervals.bootstrap_intervals(ranks, seed=4)["mean_rank"] != first["mean_rank"]


def test_higher_level_gives_a_wider_interval():
    ranks = torch.randint(1, 100, (300,), generator=torch.Generator().manual_seed(1))
    narrow = intervals.bootstrap_intervals(ranks, level=0.5)["mean_rank"]
    wide = intervals.bootstrap_intervals(ranks, level=0.99)["mean_rank"]
    assert wide.low < narrow.low and wide.high > narrow.high


def test_known_shift_is_clear_when_paired_but_hidden_between_users_when_not():
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(20, 1000, (400,), generator=generator)  # (users,)
    after = before - 5 + torch.randint(-3, 4, (400,), generator=generator)  # every user gains ~5 places
    unpaired_before = intervals.bootstrap_intervals(before)["mean_rank"]
    unpaired_after = intervals.bootstrap_intervals(after)["mean_rank"]
    assert unpaired_after.high > unpaired_before.low  # the separate intervals overlap
    change = intervals.paired_differences(before, after)["mean_rank"]
    assert change.excludes_zero() and change.high < 0
    assert change.value == pytest.approx((after - before).double().mean().item())


def test_paired_difference_is_after_minus_before():
    change = intervals.paired_differences([10, 10, 10], [1, 1, 1], resamples=100)
    assert change["hit@5"] == Interval(1.0, 1.0, 1.0)
    assert change["mean_rank"] == Interval(-9.0, -9.0, -9.0)


def test_paired_differences_of_different_lengths_raise():
    with pytest.raises(ValueError, match="3 ranks in ranks_a and 2 in ranks_b"):
        intervals.paired_differences([1, 2, 3], [1, 2])


@pytest.mark.parametrize(("ranks", "message"), [([], "non-empty"), ([1, 0, 2], "1-based")])
def test_empty_or_zero_ranks_raise(ranks, message):
    with pytest.raises(ValueError, match=message):
        intervals.bootstrap_intervals(ranks)


def test_interval_covers_the_true_mean_in_most_simulated_samples():
    # Ranks uniform on 1..40: the true Hit@10 is exactly 10/40 = 0.25.
    generator = torch.Generator().manual_seed(0)
    trials, covered = 200, 0
    for trial in range(trials):
        ranks = torch.randint(1, 41, (200,), generator=generator)
        interval = intervals.bootstrap_intervals(ranks, resamples=400, seed=trial)["hit@10"]
        covered += interval.low <= 0.25 <= interval.high
    assert 0.88 <= covered / trials <= 0.99  # nominal 0.95; the percentile bootstrap runs a little short


def test_align_by_sample_index_keeps_common_users_in_index_order():
    a = {"sample_index": [7, 2, 5], "rank": [70, 20, 50]}
    b = {"sample_index": [5, 9, 2], "rank": [51, 91, 21]}
    aligned = intervals.align_by_sample_index(a, b)
    assert aligned.common == 2 and aligned.sample_index == [2, 5]
    assert aligned.ranks_a.tolist() == [20, 50] and aligned.ranks_b.tolist() == [21, 51]


def test_per_user_record_is_plain_json_ints():
    record = intervals.per_user_record([4, 9], torch.tensor([3, 1]))
    assert record == {"sample_index": [4, 9], "rank": [3, 1]}
    assert all(type(v) is int for v in record["rank"])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"sample_index": [0, 1], "rank": [1]}, "'sample_index' has 2 entries but 'rank' has 1"),
        ({"sample_index": [0], "rank": [0]}, r"x\.rank\[0\]: ranks are 1-based"),
        ({"sample_index": [3, 3], "rank": [1, 2]}, "repeated"),
        ({"sample_index": [0], "rank": ["1"]}, r"x\.rank: expected a list of integers"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_per_user_record_names_the_field(record, message):
    with pytest.raises(ValueError, match=message):
        intervals.check_per_user(record, "x")


def test_format_interval_uses_four_decimals_and_one_for_mean_rank():
    assert intervals.format_interval(Interval(0.045, 0.02, 0.075), "hit@5") == "0.0450 [0.0200, 0.0750]"
    assert intervals.format_interval(Interval(301.24, 280.1, 322.0), "mean_rank") == "301.2 [280.1, 322.0]"
    signed = intervals.format_interval(Interval(-5.0, -6.5, -3.3), "mean_rank", signed=True)
    assert signed == "-5.0 [-6.5, -3.3]"
    assert intervals.format_interval(Interval(0.01, -0.01, 0.03), "ndcg@20", signed=True) == (
        "+0.0100 [-0.0100, +0.0300]"
    )


def test_format_difference_says_whether_zero_is_excluded():
    assert intervals.format_difference(Interval(-2.0, -3.0, -1.0), "mean_rank").endswith("(excludes 0)")
    assert intervals.format_difference(Interval(0.1, -0.1, 0.3), "hit@20").endswith("(includes 0)")


def test_an_interval_touching_zero_does_not_exclude_it():
    assert not Interval(0.0, 0.0, 0.0).excludes_zero()
    assert not Interval(0.5, 0.0, 1.0).excludes_zero()
