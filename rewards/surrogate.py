"""Clipped surrogate losses of RecPO (DESIGN.md section 3, step 6): the token term's clipping and the item loss.

The item loss L_item treats the in-batch softmax probability p_j of rollout j's own target as a policy and
optimises it with the same clipped surrogate as the tokens, with ratio p_j / p_j.detach(): the ratio is 1
in value (a single update per batch), so the loss value is -mean(A_j) over relabelled rollouts, while its
gradient is -A_j * grad(log p_j), flowing into both the user vectors and the item vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.prior import popularity_log_q


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28
) -> torch.Tensor:
    """Per-element loss -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) (shapes broadcast)."""
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def duplicate_columns(item_ids: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
    """`(R, B)` bool: the columns each rollout's softmax must drop so that every item counts once.

    item_ids `(B,)` names the item in each column (gathered from several processes, an item can fill
    more than one); target_cols `(R,)` is each rollout's own column. A rollout keeps its own column and
    drops the other copies of its target; of any other item it keeps the first copy only.
    """
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)  # (B, B)
    repeated = torch.tril(same, diagonal=-1).any(dim=1)  # (B,): an earlier column holds the same item
    drop = repeated.unsqueeze(0).expand(target_cols.size(0), -1).clone()  # (R, B)
    drop |= same[target_cols]  # every copy of the rollout's own target ...
    drop.scatter_(1, target_cols.unsqueeze(1), False)  # ... but its own column
    return drop


def target_log_frequency(targets, num_items: int) -> torch.Tensor:
    """`(num_items,)` log q(i): how often each item is a training target, add-one smoothed (sums to 1).

    In-batch negatives are other samples' targets, so q is also the rate at which an item shows up as a
    column of the item loss; subtracting log q from its logits is the sampled-softmax correction. The
    popularity prior (`rewards.prior`) counts the same way.
    """
    return popularity_log_q(targets, num_items)


def mixed_log_frequency(log_q: torch.Tensor, targets: int, uniform: int) -> torch.Tensor:
    """`(num_items,)` log of the rate at which an item fills a column of the item loss, when `targets` columns
    are training targets (drawn with frequency q) and `uniform` columns are drawn uniformly from the catalog:
    log((targets * q(i) + uniform / N) / (targets + uniform)). Equals log q without uniform columns."""
    if uniform == 0:
        return log_q
    num_items = log_q.numel()
    mixed = (targets * log_q.double().exp() + uniform / num_items) / (targets + uniform)
    return mixed.log().to(log_q.dtype)


def in_batch_logits(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    target_cols: torch.Tensor,
    tau: float,
    *,
    item_ids: torch.Tensor | None = None,
    column_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(R, B)` logits of the in-batch item softmax: cos(u_j, v_b) / tau, plus column_bias `(B,)` if given,
    with -inf on the columns `duplicate_columns` drops when item_ids `(B,)` is given. Shared by the item
    surrogate and the no-reasoning cross-entropy."""
    users = F.normalize(user_vecs.float(), dim=-1, eps=1e-8)  # (R, d)
    items = F.normalize(item_vecs.float(), dim=-1, eps=1e-8)  # (B, d)
    logits = users @ items.T / tau  # (R, B)
    if column_bias is not None:
        logits = logits + column_bias.float().unsqueeze(0)
    if item_ids is not None:
        logits = logits.masked_fill(duplicate_columns(item_ids, target_cols), float("-inf"))
    return logits


def item_surrogate_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    target_cols: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.02,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    *,
    item_ids: torch.Tensor | None = None,
    column_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar item loss: mean clipped surrogate of the in-batch target probability over masked rollouts.

    user_vecs `(R, d)` and item_vecs `(B, d)` carry gradient; target_cols `(R,)` is the column of each
    rollout's own target in item_vecs; advantages `(R,)` are detached here; mask `(R,)` bool is the
    relabel mask. p_j = softmax_b(cos(u_j, v_b) / tau)[target_cols[j]].

    Duplicate items: when the same item fills several columns (two users of a batch share a target, or
    a gathered negative repeats one), every copy stays in the softmax, so the copies that are not the
    rollout's own column act as negatives equal to the target. Pass `item_ids` `(B,)` to count each item
    once, as one process with unique targets does (`duplicate_columns`).
    column_bias `(B,)`, when given, is added to every rollout's logit of that column (e.g. -log q(item),
    the sampled-softmax correction).
    When no rollout is masked the loss is 0 with a graph through both inputs, so backward still works.
    """
    if not mask.any():
        return (user_vecs.sum() + item_vecs.sum()) * 0.0
    logits = in_batch_logits(
        user_vecs, item_vecs, target_cols, tau, item_ids=item_ids, column_bias=column_bias
    )
    log_p = torch.log_softmax(logits, dim=-1).gather(1, target_cols.unsqueeze(1)).squeeze(1)  # (R,)
    # exp(log p - log p.detach()) is p / p.detach() without 0/0 when p underflows float32.
    ratio = torch.exp(log_p - log_p.detach())
    losses = clipped_surrogate(ratio, advantages.detach().float(), eps_low, eps_high)  # (R,)
    return losses[mask].mean()
