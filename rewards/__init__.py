"""RecPO rewards: the fused ranking reward as TRL reward functions, plus a name -> function registry.

The fused reward R = (1 - beta) * NDCG@K + beta * P (DESIGN.md section 3) is two plain reward functions,
`ndcg` and `softmax`, that TRL sums with `reward_weights` (0.95, 0.05 by default) and logs as
`rewards/ndcg/mean` and `rewards/softmax/mean`.

Contract with the trainer. TRL 1.16 calls each function as
`f(prompts=..., completions=..., completion_ids=..., **kwargs)`, where kwargs hold every dataset column
(one entry per completion) and the trainer state. RecPOTrainer adds, in `_calculate_rewards`:

- `scores`: float tensor `(n_completions, n_items)`, each completion's user vector scored against the
  full catalog, already divided by tau (any float dtype, any device; computed in float32 here). A list
  of n_completions `(n_items,)` rows is accepted too: that is what TRL hands over when the trainer
  stores each row in its completion's input dict, since TRL turns every input key into a list.
- `target`: `list[int]`, one target item column per completion.
- `history`: `list[list[int]]`, one list of history item columns per completion (masked out of the
  ranking; the target is never masked).
- `ndcg_cutoff`: int K of NDCG@K (default 1000). A per-completion list of equal ints is accepted too.

Each function returns `list[float]` of length n_completions. Both rebuild the history mask themselves
(cheap next to the scoring) rather than share a global cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rewards.ranking import history_mask, ndcg_reward, softmax_reward, target_rank

__all__ = ["REWARD_FUNCS", "get_reward_funcs", "ndcg", "softmax"]


def _ranking_inputs(
    scores: torch.Tensor | Sequence[torch.Tensor],
    target: Sequence[int] | torch.Tensor,
    history: Sequence[Sequence[int]] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores `(n, items)`, target `(n,)` and history mask `(n, items)` of a reward call, on one device."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.stack(list(scores))  # per-completion rows, as TRL collects input columns
    if len(target) != scores.shape[0] or len(history) != scores.shape[0]:
        raise ValueError(
            f"rewards/__init__.py: scores has {scores.shape[0]} rows but target has {len(target)} and "
            f"history {len(history)} entries; expected one per completion"
        )
    target = torch.as_tensor(target, dtype=torch.long, device=scores.device)
    return scores, target, history_mask(history, scores.shape[1], device=scores.device)


def _cutoff(ndcg_cutoff: int | Sequence[int]) -> int:
    if isinstance(ndcg_cutoff, int):
        return ndcg_cutoff
    values = set(ndcg_cutoff)
    if len(values) != 1:
        raise ValueError(f"rewards/__init__.py: ndcg_cutoff must be one int, got the values {sorted(values)}")
    return int(values.pop())


def ndcg(
    prompts: list | None = None,
    completions: list | None = None,
    completion_ids: list | None = None,
    *,
    scores: torch.Tensor | Sequence[torch.Tensor],
    target: Sequence[int],
    history: Sequence[Sequence[int]],
    ndcg_cutoff: int | Sequence[int] = 1000,
    **kwargs,
) -> list[float]:
    """NDCG@K of each completion's target rank over the non-history catalog (the 1 - beta term)."""
    scores, target, exclude = _ranking_inputs(scores, target, history)
    rank = target_rank(scores, target, exclude)
    return ndcg_reward(rank, k=_cutoff(ndcg_cutoff)).tolist()


def softmax(
    prompts: list | None = None,
    completions: list | None = None,
    completion_ids: list | None = None,
    *,
    scores: torch.Tensor | Sequence[torch.Tensor],
    target: Sequence[int],
    history: Sequence[Sequence[int]],
    **kwargs,
) -> list[float]:
    """Softmax probability of each completion's target over the non-history catalog (the beta term)."""
    scores, target, exclude = _ranking_inputs(scores, target, history)
    return softmax_reward(scores, target, exclude).tolist()


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {"ndcg": ndcg, "softmax": softmax}


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float]]]:
    """The registered reward functions for `names`, in order."""
    unknown = [name for name in names if name not in REWARD_FUNCS]
    if unknown:
        raise ValueError(
            f"rewards: unknown reward function(s) {unknown}; valid names are {sorted(REWARD_FUNCS)}"
        )
    return [REWARD_FUNCS[name] for name in names]
