"""The popularity prior of the score (rewards/prior.py): log q by hand, with and without a half-life."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from rewards.prior import MS_PER_DAY, ScorePrior, popularity_log_q, train_prior


def test_log_q_is_the_add_one_smoothed_share_of_targets():
    # 4 items, targets 0, 0, 0, 2: counts 3, 0, 1, 0; plus one each: 4, 1, 2, 1 over 8.
    log_q = popularity_log_q([0, 0, 0, 2], 4)
    assert log_q.dtype == torch.float32
    assert log_q.tolist() == pytest.approx(
        [math.log(4 / 8), math.log(1 / 8), math.log(2 / 8), math.log(1 / 8)]
    )


def test_a_half_life_counts_older_targets_less():
    # Half-life 2 days; item 0 four days before the last target (weight 1/4), item 1 at the last one (weight 1),
    # item 1 again two days before (weight 1/2): counts 0.25, 1.5, 0 -> 1.25, 2.5, 1 over 4.75.
    day = MS_PER_DAY
    log_q = popularity_log_q([0, 1, 1], 3, timestamps=[6 * day, 10 * day, 8 * day], half_life_days=2.0)
    assert log_q.exp().tolist() == pytest.approx([1.25 / 4.75, 2.5 / 4.75, 1 / 4.75])


def test_a_half_life_needs_a_timestamp_per_target_and_a_positive_length():
    with pytest.raises(ValueError, match="one timestamp per target"):
        popularity_log_q([0, 1], 2, timestamps=[1], half_life_days=1.0)
    with pytest.raises(ValueError, match="positive"):
        popularity_log_q([0, 1], 2, timestamps=[1, 2], half_life_days=0.0)
    with pytest.raises(ValueError, match="catalog size 2"):
        popularity_log_q([0, 2], 2)


def test_the_prior_adds_weight_times_log_q_and_survives_a_round_trip():
    prior = ScorePrior(2.0, torch.log(torch.tensor([0.5, 0.25, 0.25])))
    assert prior.bias.tolist() == pytest.approx([2 * math.log(0.5), 2 * math.log(0.25), 2 * math.log(0.25)])
    again = ScorePrior.from_dict(prior.to_dict())
    assert again.weight == 2.0 and torch.equal(again.log_q, prior.log_q)
    with pytest.raises(ValueError, match="score_prior.pt: expected the fields weight and log_q"):
        ScorePrior.from_dict({"weight": 1.0}, "score_prior.pt")


def test_a_train_split_gives_its_prior_and_weight_zero_none():
    train = Dataset.from_dict({"target": [1, 1, 0], "timestamp": [0, MS_PER_DAY, MS_PER_DAY]})
    assert train_prior(train, 3, 0.0) is None
    prior = train_prior(train, 3, 1.5)
    assert prior.weight == 1.5 and prior.half_life_days is None
    assert prior.log_q.exp().tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6])
    decayed = train_prior(train, 3, 1.0, half_life_days=1.0)  # the first target is a day old: it counts 1/2
    assert decayed.log_q.exp().tolist() == pytest.approx([2 / 5.5, 2.5 / 5.5, 1 / 5.5])
