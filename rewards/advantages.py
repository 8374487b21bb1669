"""Group-relative advantages and the relabel mask of RecPO (DESIGN.md section 3, steps 4 and 5).

Rewards arrive flat, `(n * G,)`, with the G rollouts of each prompt consecutive, as TRL orders them.
"""

from __future__ import annotations

import torch

ADVANTAGE_KINDS = ("gaussian", "leave_one_out")


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or values.dim() != 1 or values.numel() % group_size:
        raise ValueError(
            f"rewards/advantages.py: expected a flat tensor whose length is a multiple of group_size "
            f"{group_size}, got shape {tuple(values.shape)}"
        )
    return values.float().view(-1, group_size)  # (groups, G)


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "gaussian") -> torch.Tensor:
    """Advantage `(n * G,)` (float32) of every rollout against the other rollouts of its group.

    `gaussian`: (r - group mean) / (unbiased group std + 1e-8), as TRL's GRPO does.
    `leave_one_out`: r minus the mean of the other G - 1 rewards of the group.
    A group whose rewards are all equal gets exact zeros (not float noise over 1e-8), and G = 1 gives
    zeros, so no group ever produces NaN.
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(
            f"rewards/advantages.py: unknown advantage kind {kind!r}; expected one of {ADVANTAGE_KINDS}"
        )
    # float64 inside: rewards a few ulps apart (a near-flat group) would otherwise leave float32
    # cancellation noise of ~1e-4 in advantages of unit scale, and a group's sum away from zero.
    grouped = _grouped(rewards, group_size).double()  # (groups, G)
    if group_size == 1:
        return torch.zeros_like(grouped).view(-1).float()
    if kind == "gaussian":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        advantages = centred / (grouped.std(dim=1, keepdim=True) + 1e-8)
    else:
        others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - others_mean
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (groups, 1)
    return advantages.masked_fill(flat, 0.0).view(-1).float()


def relabel_mask(advantages: torch.Tensor, group_size: int, topk: int = 1) -> torch.Tensor:
    """Boolean `(n * G,)` mask of the `topk` rollouts of each group with the highest advantage.

    Ties go to the earlier rollout, so the choice is deterministic. `topk` above G selects the whole group.
    """
    if topk < 0:
        raise ValueError(f"rewards/advantages.py: topk must be >= 0, got {topk}")
    grouped = _grouped(advantages, group_size)  # (groups, G)
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices  # (groups, G)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(1, order[:, : min(topk, group_size)], True)
    return mask.view(-1)
