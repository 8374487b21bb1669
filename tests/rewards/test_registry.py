"""The TRL reward functions and registry of rewards/__init__.py, called the way TRL 1.16 calls them."""

from __future__ import annotations

import math

import pytest
import torch

from rewards import REWARD_FUNCS, get_reward_funcs


def trl_call(func, scores, target: list[int], history: list[list[int]], **extra) -> list[float]:
    n = len(scores)
    return func(
        prompts=[[{"role": "user", "content": "recommend"}]] * n,
        completions=[[{"role": "assistant", "content": "because <answer>"}]] * n,
        completion_ids=[[1, 2, 3]] * n,
        scores=scores,
        target=target,
        history=history,
        user_id=list(range(n)),  # any other dataset column
        trainer_state=None,
        **extra,
    )


def test_registry_names_match_trl_logging_names():
    assert set(REWARD_FUNCS) == {"ndcg", "softmax"}
    assert [f.__name__ for f in get_reward_funcs(["ndcg", "softmax"])] == ["ndcg", "softmax"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"\['ndcg', 'softmax'\]"):
        get_reward_funcs(["ndcg", "accuracy"])


def test_reward_functions_mask_history_and_return_floats():
    scores = torch.tensor([[9.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    target, history = [1, 3, 0], [[0], [], [0, 1]]
    ndcg_values = trl_call(REWARD_FUNCS["ndcg"], scores, target, history, ndcg_cutoff=1000)
    assert ndcg_values == pytest.approx([1.0, 1 / math.log2(3), 0.5])
    softmax_values = trl_call(REWARD_FUNCS["softmax"], scores, target, history)
    expected = [math.exp(2) / (math.exp(2) + math.e + 1), math.e / (2 + math.exp(5) + math.e), 1 / 3]
    assert softmax_values == pytest.approx(expected)
    assert all(type(v) is float for v in ndcg_values + softmax_values)


def test_ndcg_cutoff_applies_and_defaults_to_1000():
    scores = torch.arange(1100, 0, -1, dtype=torch.float32).unsqueeze(0).repeat(2, 1)
    target, history = [999, 1000], [[], []]
    assert trl_call(REWARD_FUNCS["ndcg"], scores, target, history) == pytest.approx(
        [1 / math.log2(1001), 0.0]
    )
    assert trl_call(REWARD_FUNCS["ndcg"], scores, target, history, ndcg_cutoff=[5000, 5000])[1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # every score is exact in bfloat16
def test_fused_reward_of_a_hand_made_score_matrix(dtype):
    scores = torch.tensor(
        [
            [2.0, 1.0, 3.0, 1.0, 0.0],  # target 1, history item 2 (the best) masked, item 3 ties: rank 3
            [0.5, 0.5, 0.5, 4.0, -1.0],  # target 3 in its own history: still ranked, first
            [1.0, 1.0, 1.0, 1.0, 1.0],  # every item ties: last of 5
        ],
        dtype=dtype,
    )
    target, history = [1, 3, 4], [[2], [3, 0], []]
    fused = [
        0.95 * n + 0.05 * p
        for n, p in zip(
            trl_call(REWARD_FUNCS["ndcg"], scores, target, history),
            trl_call(REWARD_FUNCS["softmax"], scores, target, history),
            strict=True,
        )
    ]
    e = math.exp
    ndcg_by_hand = [1 / math.log2(3 + 1), 1.0, 1 / math.log2(5 + 1)]
    softmax_by_hand = [
        e(1.0) / (e(2.0) + e(1.0) + e(1.0) + e(0.0)),  # over items 0, 1, 3, 4
        e(4.0) / (e(0.5) + e(0.5) + e(4.0) + e(-1.0)),  # over items 1, 2, 3, 4
        1 / 5,
    ]
    expected = [0.95 * n + 0.05 * p for n, p in zip(ndcg_by_hand, softmax_by_hand, strict=True)]
    assert fused == pytest.approx(expected, rel=1e-6)


def test_mismatched_lengths_are_reported():
    with pytest.raises(ValueError, match="one per completion"):
        trl_call(REWARD_FUNCS["ndcg"], torch.zeros(2, 3), [0], [[], []])


def test_scores_given_as_per_completion_rows_match_the_tensor():
    torch.manual_seed(1)
    scores = torch.randn(4, 12) * 50
    target, history = [0, 5, 11, 3], [[1, 2], [], [11], [0, 3, 4]]
    for func in get_reward_funcs(["ndcg", "softmax"]):
        rows = trl_call(func, list(scores), target, history, ndcg_cutoff=[1000] * 4)
        assert rows == trl_call(func, scores, target, history)
