"""The popularity prior of the score: s(u, i) = cos(h_u, h_i) / tau + lambda * log q(i).

Not in the paper (lambda = 0 reproduces it). q(i) is item i's share of the train split's targets, add-one
smoothed, optionally with each target counted less the older it is (a half-life in days before the last train
target). Why it helps: an in-batch softmax whose negatives are the batch's own targets (drawn by popularity)
learns about log p(i|u) - log q(i), and the ranking that minimises error over the full catalog adds log q(i)
back (logit adjustment; the sampling-bias correction of two-tower retrieval). A small model cannot learn an
item's popularity from its title; the prior hands it over.

One tensor, `weight * log q`, is added to every user's scores by whatever ranks (`recipes.evaluation.
cosine_scores`: the RecPO rewards, the trainer's evaluation, `recipes.evaluate`, `recipes.recommend`), and to
every in-batch column by the item loss (`RecPOTrainer._item_loss`), so the loss trains the score that ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MS_PER_DAY = 86_400_000


def popularity_log_q(
    targets: Sequence[int] | torch.Tensor,
    num_items: int,
    timestamps: Sequence[int] | torch.Tensor | None = None,
    half_life_days: float | None = None,
) -> torch.Tensor:
    """`(num_items,)` float32 log q(i), q summing to 1: (count(i) + 1) / (total + num_items).

    With `half_life_days`, a target at time t counts 2^(-(t_last - t) / half_life) instead of 1, t_last being the
    latest of `timestamps` (milliseconds, one per target).
    """
    targets = torch.as_tensor(
        list(targets) if not isinstance(targets, torch.Tensor) else targets, dtype=torch.long
    )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValueError(f"rewards/prior.py: a target item index lies outside the catalog size {num_items}")
    weights = None
    if half_life_days is not None:
        if half_life_days <= 0:
            raise ValueError(f"rewards/prior.py: half_life_days must be positive, got {half_life_days}")
        if timestamps is None or len(timestamps) != len(targets):
            raise ValueError("rewards/prior.py: a half-life needs one timestamp per target")
        times = torch.as_tensor(list(timestamps), dtype=torch.float64)
        age_days = (times.max() - times) / MS_PER_DAY
        weights = torch.exp2(-age_days / half_life_days)
    counts = torch.bincount(targets, weights=weights, minlength=num_items).double()
    return torch.log((counts + 1.0) / (counts.sum() + num_items)).float()


@dataclass
class ScorePrior:
    """lambda and log q of a run: what `cosine_scores` adds to the scores is `weight * log_q`."""

    weight: float
    log_q: torch.Tensor  # (items,)
    half_life_days: float | None = None
    source: str = "train split targets"

    @property
    def bias(self) -> torch.Tensor:
        """`(items,)` float32: weight * log q(i), the term added to every user's score of item i."""
        return (self.weight * self.log_q).float()

    def to_dict(self) -> dict:
        return {
            "weight": self.weight,
            "log_q": self.log_q.cpu(),
            "half_life_days": self.half_life_days,
            "num_items": int(self.log_q.numel()),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "prior") -> ScorePrior:
        try:
            log_q = torch.as_tensor(data["log_q"], dtype=torch.float32)
            weight = float(data["weight"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: expected the fields weight and log_q ({err})") from err
        if log_q.dim() != 1 or not math.isfinite(weight):
            raise ValueError(f"{where}: log_q must be one value per item and weight a finite number")
        return cls(weight, log_q, data.get("half_life_days"), data.get("source", "train split targets"))


def train_prior(
    train, num_items: int, weight: float, half_life_days: float | None = None
) -> ScorePrior | None:
    """The prior of a train split (a `datasets.Dataset` with `target` and `timestamp`), or None at weight 0."""
    if weight == 0:
        return None
    table = train.with_format("arrow")  # Arrow's to_pylist is ~10x faster than iterating rows
    timestamps = table["timestamp"].to_pylist() if half_life_days is not None else None
    log_q = popularity_log_q(table["target"].to_pylist(), num_items, timestamps, half_life_days)
    return ScorePrior(weight, log_q, half_life_days)
