"""Clipped surrogate and in-batch item loss of rewards/surrogate.py, checked against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.surrogate import clipped_surrogate, duplicate_columns, item_surrogate_loss, target_log_frequency
from tests.numerics import assert_close_at_scale


def test_clipped_surrogate_is_minus_advantage_at_ratio_one():
    advantages = torch.tensor([1.0, -0.5, 0.0])
    assert clipped_surrogate(torch.ones(3), advantages).tolist() == [-1.0, 0.5, 0.0]


def test_clipped_surrogate_clips_asymmetrically():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss = clipped_surrogate(ratio, advantages)
    # A > 0 caps the gain at 1 + eps_high; A < 0 caps it at 1 - eps_low; the pessimistic branch wins.
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8, -1.1])
    loss.sum().backward()
    assert ratio.grad.tolist() == pytest.approx([0.0, 1.0, -1.0, 0.0, -1.0])


def test_clipped_surrogate_takes_custom_epsilons():
    loss = clipped_surrogate(torch.tensor([2.0, 0.0]), torch.tensor([1.0, -1.0]), eps_low=0.1, eps_high=0.5)
    assert loss.tolist() == pytest.approx([-1.5, 0.9])


def two_users_three_items() -> tuple[torch.Tensor, torch.Tensor]:
    # Unit-free cosines: user 0 points at item 0 (cosines 1, 0, -1), user 1 at item 1 (0, 1, 0).
    users = torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    items = torch.tensor([[1.0, 0.0], [0.0, 0.5], [-4.0, 0.0]], requires_grad=True)
    return users, items


def test_item_loss_value_and_gradients_by_hand():
    users, items = two_users_three_items()
    advantages = torch.tensor([1.0, -0.5])
    loss = item_surrogate_loss(
        users, items, torch.tensor([0, 1]), advantages, torch.tensor([True, True]), tau=1.0
    )
    assert loss.item() == pytest.approx(-(1.0 - 0.5) / 2)  # ratio 1: loss is -mean(A)
    loss.backward()
    # d loss / d u0 = -(A0 / 2) * d log p0 / d u0, and d cos(u, v) / d u = (v_hat - cos * u_hat) / |u|.
    # Only item 1 is off the user 0 axis: d log p0 / d u0 = -p(item 1 | user 0) * (0, 1) / |u0|.
    p01 = 1.0 / (math.e + 1.0 + 1.0 / math.e)
    assert users.grad[0].tolist() == pytest.approx([0.0, 0.5 * p01 / 2.0])
    assert users.grad.abs().sum() > 0 and items.grad.abs().sum() > 0
    assert torch.isfinite(items.grad).all()


def test_item_loss_gradient_is_the_policy_gradient_of_log_p():
    torch.manual_seed(0)
    users = torch.randn(6, 8, requires_grad=True)
    items = torch.randn(4, 8, requires_grad=True)
    target_cols = torch.tensor([0, 1, 2, 3, 0, 1])
    advantages = torch.randn(6)
    mask = torch.tensor([True, False, True, True, False, True])
    item_surrogate_loss(users, items, target_cols, advantages, mask).backward()

    ref_users = users.detach().clone().requires_grad_(True)
    ref_items = items.detach().clone().requires_grad_(True)
    cos = torch.nn.functional.cosine_similarity(ref_users.unsqueeze(1), ref_items.unsqueeze(0), dim=-1)
    log_p = torch.log_softmax(cos / 0.02, dim=-1).gather(1, target_cols.unsqueeze(1)).squeeze(1)
    (-(advantages * log_p)[mask].mean()).backward()
    assert_close_at_scale(users.grad, ref_users.grad)
    assert_close_at_scale(items.grad, ref_items.grad)


def test_item_loss_only_counts_masked_rollouts():
    users, items = two_users_three_items()
    loss = item_surrogate_loss(
        users, items, torch.tensor([0, 1]), torch.tensor([1.0, -0.5]), torch.tensor([False, True])
    )
    assert loss.item() == pytest.approx(0.5)


def test_item_loss_with_empty_mask_is_zero_and_backpropagates():
    users, items = two_users_three_items()
    loss = item_surrogate_loss(
        users, items, torch.tensor([0, 1]), torch.ones(2), torch.zeros(2, dtype=torch.bool)
    )
    assert loss.item() == 0.0
    loss.backward()
    assert users.grad.abs().sum() == 0 and items.grad is not None


def test_item_ids_drop_duplicate_copies_of_the_target():
    users = torch.tensor([[1.0, 0.0]], requires_grad=True)
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    cols, adv, mask = torch.tensor([0]), torch.tensor([1.0]), torch.tensor([True])
    kept = item_surrogate_loss(users, items, cols, adv, mask, tau=1.0)
    dropped = item_surrogate_loss(users, items, cols, adv, mask, tau=1.0, item_ids=torch.tensor([7, 7, 9]))
    assert kept.item() == dropped.item() == pytest.approx(-1.0)
    dropped.backward()
    assert items.grad[1].abs().sum() == 0  # the duplicate column no longer competes with the target


def test_item_ids_count_a_repeated_negative_once():
    # Columns [a, b, a', c]: a' is a second copy of item a (gathered from another process). Rollout 0's target
    # is b, so a is only a negative there and must count once; rollout 1's target is the copy a'.
    gen = torch.Generator().manual_seed(1)
    users = torch.randn(2, 4, generator=gen)
    base = torch.randn(3, 4, generator=gen)  # items a, b, c
    adv, mask = torch.tensor([0.8, -0.5]), torch.tensor([True, True])
    copied = base[[0, 1, 0, 2]].clone().requires_grad_(True)
    unique = base.clone().requires_grad_(True)
    with_copy = item_surrogate_loss(
        users, copied, torch.tensor([1, 2]), adv, mask, tau=0.5, item_ids=torch.tensor([10, 11, 10, 12])
    )
    reference = item_surrogate_loss(users, unique, torch.tensor([1, 0]), adv, mask, tau=0.5)
    assert_close_at_scale(with_copy, reference)
    with_copy.backward()
    reference.backward()
    grads = copied.grad
    assert_close_at_scale(grads[0] + grads[2], unique.grad[0])  # the two copies share item a's gradient
    assert_close_at_scale(grads[[1, 3]], unique.grad[[1, 2]])
    assert duplicate_columns(torch.tensor([10, 11, 10, 12]), torch.tensor([1, 2])).tolist() == [
        [False, False, True, False],  # target b: the second a goes
        [True, False, False, False],  # target a': its own column stays, the first a goes
    ]


def test_item_loss_accepts_bfloat16_vectors():
    users, items = two_users_three_items()
    loss = item_surrogate_loss(
        users.bfloat16(),
        items.bfloat16(),
        torch.tensor([0, 1]),
        torch.ones(2),
        torch.ones(2, dtype=torch.bool),
    )
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(users.grad).all()


def test_target_log_frequency_by_hand():
    # 4 items, targets 0, 0, 0, 2: add-one counts 4, 1, 2, 1 over 8.
    log_q = target_log_frequency([0, 0, 0, 2], 4)
    assert log_q.exp().tolist() == pytest.approx([0.5, 0.125, 0.25, 0.125])
    with pytest.raises(ValueError, match="catalog size 4"):
        target_log_frequency([0, 4], 4)


def test_column_bias_shifts_the_in_batch_logits_by_hand():
    # User 0 sits on item 0's axis; items 0 and 1 are orthogonal, tau = 1: logits (1, 0).
    users = torch.tensor([[1.0, 0.0]], requires_grad=True)
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    one = dict(
        target_cols=torch.tensor([0]), advantages=torch.tensor([1.0]), mask=torch.tensor([True]), tau=1.0
    )
    item_surrogate_loss(users, items, **one).backward()
    plain = users.grad.clone()
    users.grad = None
    # Bias (0, 1), i.e. item 0 is e times as frequent a target: logits (1, 1), p(item 1) = 1/2, not 1/(e + 1).
    item_surrogate_loss(users, items, **one, column_bias=torch.tensor([0.0, 1.0])).backward()
    # d log p0 / d u = -p(item 1) * (0, 1) (cos gradient of item 1 at u = (1, 0)); the loss is -log p0.
    assert plain[0, 1].item() == pytest.approx(1.0 / (math.e + 1.0))
    assert users.grad[0, 1].item() == pytest.approx(0.5)
    assert users.grad[0, 0].item() == pytest.approx(0.0)


def test_mixed_log_frequency_mixes_target_and_uniform_rates_by_hand():
    from rewards.surrogate import mixed_log_frequency

    log_q = torch.tensor([0.5, 0.3, 0.2]).log()
    # 2 target columns drawn by q, 1 column drawn uniformly from 3 items: (2 q + 1/3) / 3
    expected = ((2 * torch.tensor([0.5, 0.3, 0.2]) + 1 / 3) / 3).log()
    torch.testing.assert_close(mixed_log_frequency(log_q, 2, 1), expected)
    assert mixed_log_frequency(log_q, 2, 1).exp().sum().item() == pytest.approx(1.0)
    assert torch.equal(mixed_log_frequency(log_q, 4, 0), log_q)
