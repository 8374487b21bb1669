"""Group advantages and the relabel mask of rewards/advantages.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.advantages import group_advantages, relabel_mask


def test_gaussian_uses_the_unbiased_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()  # sqrt(5/3), unbiased
    expected = [(r - 2.5) / (std + 1e-8) for r in (1.0, 2.0, 3.0, 4.0)]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected)


def test_groups_are_consecutive():
    advantages = group_advantages(torch.tensor([0.0, 1.0, 5.0, 3.0]), 2)
    assert advantages.tolist() == pytest.approx([-0.7071, 0.7071, 0.7071, -0.7071], abs=1e-4)


def test_leave_one_out_subtracts_the_mean_of_the_others():
    advantages = group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, kind="leave_one_out")
    assert advantages.tolist() == pytest.approx([1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5])


@pytest.mark.parametrize("kind", ["gaussian", "leave_one_out"])
def test_equal_rewards_give_exact_zeros(kind: str):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1e-3, 1e-3, 1e-3])
    advantages = group_advantages(rewards, 3, kind=kind)
    assert advantages.tolist() == [0.0] * 9


@pytest.mark.parametrize("kind", ["gaussian", "leave_one_out"])
def test_group_of_one_gives_zeros(kind: str):
    assert group_advantages(torch.tensor([0.3, 0.9]), 1, kind=kind).tolist() == [0.0, 0.0]


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="leave_one_out"):
        group_advantages(torch.zeros(4), 2, kind="median")


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda g: st.tuples(
            st.just(g),
            st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=g, max_size=4 * g).map(
                lambda xs, g=g: xs[: len(xs) // g * g]
            ),
        )
    ),
    st.sampled_from(["gaussian", "leave_one_out"]),
)
def test_advantages_of_a_group_sum_to_zero(case, kind):
    group_size, rewards = case
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), group_size, kind=kind)
    assert not torch.isnan(advantages).any()
    sums = advantages.view(-1, group_size).sum(dim=1)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-4)


def test_relabel_mask_picks_the_top_k_of_each_group():
    advantages = torch.tensor([0.1, -1.0, 0.5, 0.2, 3.0, 2.0, 1.0, 0.0])
    assert relabel_mask(advantages, 4).tolist() == [False, False, True, False, True, False, False, False]
    assert relabel_mask(advantages, 4, topk=2).tolist() == [
        False,
        False,
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_relabel_mask_breaks_ties_by_position():
    advantages = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert relabel_mask(advantages, 4).tolist() == [True, False, False, False, True, False, False, False]
    assert relabel_mask(advantages, 4, topk=2).tolist() == [
        True,
        True,
        False,
        False,
        True,
        True,
        False,
        False,
    ]


def test_relabel_mask_with_topk_above_the_group_selects_it_all():
    assert relabel_mask(torch.tensor([0.0, 1.0]), 2, topk=5).tolist() == [True, True]
