"""Full-catalog ranking of one target item per user: ranks, the fused reward terms and the metrics.

Everything here is batched over users and never sorts a (users, items) matrix: the rank of the target
is 1 + the number of other non-excluded items scoring at least as high as it (ties are counted against
the target, so a model that scores every item the same earns nothing). One definition serves the
training rewards (`ndcg_reward`, `softmax_reward`) and evaluation (`hit_at_k`, `ndcg_at_k`,
`ranking_metrics`), so the two can never disagree.

Conventions: `scores` is `(users, items)` of any floating dtype on any device, `target` is `(users,)`
item columns, `exclude` is an optional boolean `(users, items)` mask of items to leave out (the user's
history, see `history_mask`). The target is never excluded, even when the mask marks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RankingHistory = Sequence[Sequence[int]] | torch.Tensor


def _as_target(target: torch.Tensor | Sequence[int], scores: torch.Tensor) -> torch.Tensor:
    target = torch.as_tensor(target, dtype=torch.long, device=scores.device)
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(
            f"rewards/ranking.py: expected scores (users, items) and target (users,), "
            f"got scores {tuple(scores.shape)} and target {tuple(target.shape)}"
        )
    return target


def _check_exclude(exclude: torch.Tensor | None, scores: torch.Tensor) -> None:
    if exclude is None:
        return
    if exclude.dtype != torch.bool or exclude.shape != scores.shape:
        raise ValueError(
            f"rewards/ranking.py: exclude must be a bool mask shaped like scores {tuple(scores.shape)}, "
            f"got {exclude.dtype} {tuple(exclude.shape)}"
        )


def history_mask(
    history: RankingHistory, num_items: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean `(users, num_items)` mask, True at each user's history items.

    `history` is either one list of item columns per user (lengths may differ, empty is fine) or a
    padded `(users, length)` integer tensor whose negative entries are padding.
    """
    if isinstance(history, torch.Tensor):
        device = history.device if device is None else device
        padded = history.to(device=device, dtype=torch.long)  # (users, length)
        if padded.dim() != 2:
            raise ValueError(
                f"rewards/ranking.py: padded history must be (users, length), got {tuple(padded.shape)}"
            )
        keep = padded >= 0
        rows = torch.arange(padded.shape[0], device=device).unsqueeze(1).expand_as(padded)[keep]
        cols = padded[keep]
        num_users = padded.shape[0]
    else:
        lengths = torch.tensor([len(h) for h in history], dtype=torch.long)
        cols = torch.tensor([i for h in history for i in h], dtype=torch.long, device=device)
        rows = torch.repeat_interleave(torch.arange(len(history)), lengths).to(device)
        num_users = len(history)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= num_items):
        raise ValueError(
            f"rewards/ranking.py: history item ids must lie in [0, {num_items}), "
            f"got min {int(cols.min())} max {int(cols.max())}"
        )
    mask = torch.zeros(num_users, num_items, dtype=torch.bool, device=device)  # (users, items)
    mask[rows, cols] = True
    return mask


def target_rank(
    scores: torch.Tensor, target: torch.Tensor | Sequence[int], exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank `(users,)` (int64) of each user's target among their non-excluded items.

    rank = 1 + the number of other non-excluded items whose score is not below the target's: ties count
    against the target, and so do NaN scores. A NaN target therefore ranks last, so a broken user vector
    can never earn a reward.
    """
    target = _as_target(target, scores)
    _check_exclude(exclude, scores)
    # Comparing in the input dtype is exact: upcasting bfloat16/float16 to float32 preserves order.
    target_score = scores.gather(1, target.unsqueeze(1))  # (users, 1)
    # Count what is strictly below instead of what is >= so that NaN comparisons (always False) land
    # on the pessimistic side; excluded items and the target itself join the "below" side.
    below = scores < target_score  # (users, items)
    if exclude is not None:
        below.masked_fill_(exclude, True)
    below.scatter_(1, target.unsqueeze(1), True)
    # An int32 accumulator counts bools about twice as fast as the default int64 on CPU.
    return 1 + scores.shape[1] - below.sum(dim=1, dtype=torch.int32).long()  # (users,)


def softmax_reward(
    scores: torch.Tensor, target: torch.Tensor | Sequence[int], exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax probability `(users,)` (float32) of the target over its non-excluded catalog.

    Computed as exp(-logsumexp(s - s_target)) in float32, so scores of any size (cos/0.02 reaches 50)
    neither overflow nor underflow to NaN. A NaN anywhere in a user's scores gives 0 for that user.
    """
    target = _as_target(target, scores)
    _check_exclude(exclude, scores)
    target_logit = scores.gather(1, target.unsqueeze(1)).float()  # (users, 1)
    # Scores relative to the target's: exact for equal scores, so float32 rounding of a large logsumexp
    # (ulp 1e-3 at 1e4) cannot leak into the probability.
    relative = scores.float() - target_logit  # (users, items)
    if exclude is not None:
        relative.masked_fill_(exclude, float("-inf"))
    relative.scatter_(1, target.unsqueeze(1), 0.0)  # never excluded; exactly 0 even for an infinite score
    log_p = -torch.logsumexp(relative, dim=1)  # (users,)
    return torch.nan_to_num(log_p.exp(), nan=0.0)


def ndcg_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k `(users,)` with one relevant item: 1/log2(rank + 1) if rank <= k else 0 (float32)."""
    rank = rank.float()
    gain = 1.0 / torch.log2(rank + 1.0)
    return torch.where(rank <= k, gain, torch.zeros_like(gain))


def hit_at_k(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Hit@k `(users,)`: 1.0 when the target is in the top k, else 0.0 (float32)."""
    return (rank <= k).float()


def ndcg_reward(rank: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """The NDCG term of the fused reward: NDCG@k of the target's rank, k = 1000 as in the paper."""
    return ndcg_at_k(rank, k)


def ranking_metrics(rank: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Mean Hit@k and NDCG@k over users: `{"hit@5": ..., "hit@10": ..., ..., "ndcg@20": ...}`."""
    metrics = {f"hit@{k}": hit_at_k(rank, k).mean().item() for k in ks}
    metrics.update({f"ndcg@{k}": ndcg_at_k(rank, k).mean().item() for k in ks})
    return metrics
