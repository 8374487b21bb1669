"""Ranking, fused reward terms and metrics of rewards/ranking.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.ranking import (
    history_mask,
    hit_at_k,
    ndcg_at_k,
    ndcg_reward,
    ranking_metrics,
    softmax_reward,
    target_rank,
)


def rank_of(scores: list[float], target: int, history: list[int] | None = None) -> int:
    mask = history_mask([history or []], len(scores))
    return int(target_rank(torch.tensor([scores]), torch.tensor([target]), mask)[0])


def test_ties_count_against_the_target():
    assert rank_of([1.0, 1.0, 1.0], 0) == 3
    assert rank_of([2.0, 1.0, 2.0, 0.5], 2) == 2


def test_rank_without_exclude_counts_every_higher_item():
    assert rank_of([0.1, 0.9, 0.5, 0.3], 2) == 2
    assert rank_of([0.1, 0.9, 0.5, 0.3], 1) == 1
    assert rank_of([0.1, 0.9, 0.5, 0.3], 0) == 4


def test_history_items_leave_the_ranking():
    assert rank_of([5.0, 4.0, 3.0, 2.0], 2, history=[0, 1]) == 1
    assert rank_of([5.0, 4.0, 3.0, 2.0], 3, history=[0]) == 3


def test_target_in_history_is_still_ranked():
    assert rank_of([5.0, 4.0, 3.0, 2.0], 2, history=[0, 2]) == 2
    assert rank_of([1.0, 1.0, 1.0], 1, history=[1]) == 3


def test_nan_target_score_ranks_last():
    assert rank_of([float("nan"), 1.0, 2.0, 3.0], 0, history=[3]) == 3
    assert rank_of([float("nan"), 1.0], 0, history=[0]) == 2
    assert rank_of([float("nan")] * 4, 2, history=[0]) == 3


def test_nan_scores_of_other_items_count_against_the_target():
    assert rank_of([1.0, float("nan"), 0.0, float("nan")], 0, history=[3]) == 2


def test_rank_is_batched_per_user():
    scores = torch.tensor([[3.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0], [50.0, 1e4, -1e4, 0.0]])
    exclude = history_mask([[0], [], [1, 2]], 4)
    assert target_rank(scores, torch.tensor([3, 1, 0]), exclude).tolist() == [1, 4, 1]


def test_bfloat16_rounding_ties_count_against_the_target():
    # bfloat16 keeps 8 significant bits: near 1.0 its spacing is 2**-7 above and 2**-8 below, so the float32
    # scores 1.001 and 0.999 both round to 1.0 and tie with a target at 1.0; 0.99 rounds to 0.98828125.
    scores = torch.tensor([[1.0, 1.001, 0.999, 1.5, 0.5, 0.99]] * 3)
    target = torch.tensor([0, 1, 0])
    exclude = history_mask([[], [], [3]], 6)
    rounded = scores.bfloat16()
    assert rounded[0].float().tolist() == [1.0, 1.0, 1.0, 1.5, 0.5, 0.98828125]
    # float32: 1.001 and 1.5 beat item 0 (rank 3); only 1.5 beats item 1 (2); with 1.5 masked, 1.001 (2).
    assert target_rank(scores, target, exclude).tolist() == [3, 2, 2]
    # bfloat16: items 1 and 2 now tie with item 0 and count against it (1 + 3 = 4), items 0 and 2 tie with
    # item 1 (4), and with 1.5 masked item 0 still loses to its two ties (3).
    assert target_rank(rounded, target, exclude).tolist() == [4, 4, 3]
    p = softmax_reward(rounded, target, exclude)
    assert p.dtype == torch.float32
    others = math.exp(0.5) + math.exp(0.98828125)
    expected = [
        math.e / (3 * math.e + math.exp(1.5) + others),
        math.e / (3 * math.e + math.exp(1.5) + others),
        math.e / (3 * math.e + others),
    ]
    assert p.tolist() == pytest.approx(expected, rel=1e-6)


def test_ndcg_reward_cutoff_is_inclusive_at_k():
    rank = torch.tensor([1, 2, 1000, 1001])
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(1001), 0.0]
    assert ndcg_reward(rank).tolist() == pytest.approx(expected)
    assert ndcg_reward(rank, k=2).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.0])


def test_ndcg_reward_boundary_through_the_catalog():
    # 1,001 items scored 1000, 999, ..., 0: item i has rank i + 1.
    scores = torch.arange(1000, -1, -1, dtype=torch.float32).unsqueeze(0).repeat(2, 1)
    rank = target_rank(scores, torch.tensor([999, 1000]))
    assert rank.tolist() == [1000, 1001]
    assert ndcg_reward(rank, k=1000).tolist() == pytest.approx([1 / math.log2(1001), 0.0])


def test_softmax_reward_over_the_non_excluded_catalog():
    scores = torch.tensor([[0.0, math.log(2.0), math.log(3.0), 5.0]])
    exclude = history_mask([[3]], 4)
    assert softmax_reward(scores, torch.tensor([2]), exclude).item() == pytest.approx(0.5)
    assert softmax_reward(scores, torch.tensor([0]), exclude).item() == pytest.approx(1 / 6)


def test_softmax_reward_keeps_a_masked_target():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    exclude = history_mask([[0, 1]], 4)
    assert softmax_reward(scores, torch.tensor([1]), exclude).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("scale", [50.0, 1e4])
def test_softmax_reward_is_finite_for_huge_scores(scale: float):
    scores = torch.tensor([[scale, 0.0, -scale], [scale, scale, 0.0], [-scale, scale, scale]])
    p = softmax_reward(scores, torch.tensor([0, 0, 0]))
    assert torch.isfinite(p).all()
    assert p[0].item() == pytest.approx(1.0)
    assert p[1].item() == pytest.approx(0.5)
    assert 0.0 <= p[2].item() < 1e-20
    excluded = softmax_reward(scores, torch.tensor([0, 0, 0]), history_mask([[1, 2], [1], [1, 2]], 3))
    assert excluded.tolist() == [1.0, 1.0, 1.0]


def test_softmax_reward_of_nan_scores_is_zero():
    assert softmax_reward(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0])).item() == 0.0


def test_history_mask_from_lists_and_padded_tensor_agree():
    from_lists = history_mask([[0, 3], [], [1]], 5)
    from_padded = history_mask(torch.tensor([[0, 3], [-1, -1], [1, -1]]), 5)
    assert torch.equal(from_lists, from_padded)
    assert from_lists.tolist() == [
        [True, False, False, True, False],
        [False, False, False, False, False],
        [False, True, False, False, False],
    ]


def test_history_mask_rejects_items_outside_the_catalog():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        history_mask([[0, 5]], 5)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="target"):
        target_rank(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="exclude"):
        target_rank(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.bool))


def test_metrics_from_ranks():
    rank = torch.tensor([1, 3, 7, 30])
    assert hit_at_k(rank, 5).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ndcg_at_k(rank, 10).tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])
    metrics = ranking_metrics(rank)
    assert list(metrics) == ["hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20"]
    assert metrics["hit@10"] == pytest.approx(0.75)
    assert metrics["ndcg@5"] == pytest.approx(1.5 / 4)
    assert all(isinstance(v, float) for v in metrics.values())


@st.composite
def ranking_cases(draw):
    users = draw(st.integers(1, 4))
    items = draw(st.integers(1, 10))
    values = st.integers(-3, 3).map(float)  # small integers make ties common
    scores = draw(st.lists(st.lists(values, min_size=items, max_size=items), min_size=users, max_size=users))
    exclude = draw(
        st.lists(st.lists(st.booleans(), min_size=items, max_size=items), min_size=users, max_size=users)
    )
    target = draw(st.lists(st.integers(0, items - 1), min_size=users, max_size=users))
    return torch.tensor(scores), torch.tensor(target), torch.tensor(exclude)


def reference_rank(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> list[int]:
    ranks = []
    for row, t, ex in zip(scores.tolist(), target.tolist(), exclude.tolist(), strict=True):
        ranks.append(1 + sum(1 for i, s in enumerate(row) if i != t and not ex[i] and s >= row[t]))
    return ranks


@settings(max_examples=100, deadline=None)
@given(ranking_cases())
def test_rank_lies_between_one_and_the_candidate_count(case):
    scores, target, exclude = case
    rank = target_rank(scores, target, exclude)
    candidates = (~exclude).sum(1) + exclude.gather(1, target.unsqueeze(1)).squeeze(1).long()
    assert (rank >= 1).all() and (rank <= candidates).all()
    assert rank.tolist() == reference_rank(scores, target, exclude)


@settings(max_examples=100, deadline=None)
@given(ranking_cases(), st.integers(0, 4))
def test_raising_the_target_score_never_worsens_its_rank(case, raise_by):
    scores, target, exclude = case
    raised = scores.clone()
    raised.scatter_add_(1, target.unsqueeze(1), torch.full((len(target), 1), float(raise_by)))
    assert (target_rank(raised, target, exclude) <= target_rank(scores, target, exclude)).all()
    assert (softmax_reward(raised, target, exclude) >= softmax_reward(scores, target, exclude) - 1e-6).all()


@settings(max_examples=100, deadline=None)
@given(ranking_cases())
def test_softmax_reward_matches_a_direct_softmax(case):
    scores, target, exclude = case
    exclude = exclude.clone()
    exclude.scatter_(1, target.unsqueeze(1), False)
    expected = torch.softmax(scores.masked_fill(exclude, float("-inf")), dim=1).gather(1, target.unsqueeze(1))
    assert torch.allclose(softmax_reward(scores, target, exclude), expected.squeeze(1), atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 10, 20])
def test_hit_and_ndcg_agree_with_torchmetrics(k: int):
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG

    generator = torch.Generator().manual_seed(k)
    users, items = 64, 40
    scores = torch.randn(users, items, generator=generator, dtype=torch.float64)  # ties have probability 0
    target = torch.randint(0, items, (users,), generator=generator)
    exclude = torch.rand(users, items, generator=generator) < 0.2
    exclude.scatter_(1, target.unsqueeze(1), False)
    rank = target_rank(scores, target, exclude)

    relevant = torch.zeros(users, items, dtype=torch.long).scatter_(1, target.unsqueeze(1), 1)
    indexes = torch.arange(users).unsqueeze(1).expand(users, items)
    keep = ~exclude  # torchmetrics only sees the candidates
    hit_rate = RetrievalHitRate(top_k=k)(scores[keep], relevant[keep], indexes=indexes[keep])
    ndcg = RetrievalNormalizedDCG(top_k=k)(scores[keep], relevant[keep], indexes=indexes[keep])
    assert hit_at_k(rank, k).mean().item() == pytest.approx(hit_rate.item(), abs=1e-6)
    assert ndcg_at_k(rank, k).mean().item() == pytest.approx(ndcg.item(), abs=1e-6)
