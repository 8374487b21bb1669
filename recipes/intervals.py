"""95% bootstrap intervals of the ranking metrics, and paired intervals for comparisons on the same users.

Every metric here is a mean over users of a per-user value computed from the target's 1-based rank:
Hit@K and NDCG@K from `rewards.ranking` (the one definition shared by rewards and evaluation) and the
rank itself (`mean_rank`). `bootstrap_intervals` resamples users with replacement and reports the
percentile interval of each mean; `paired_differences` does the same for the per-user difference of
two runs on the same users, which removes the between-user spread that dominates the unpaired
intervals (a user who is easy for one model is usually easy for the other).

Per-user contract. A results JSON (the trainer's `results.json` / `results_before.json`, the `--out`
files of `recipes.evaluate` and `recipes.baselines`) may carry, beside its `{"<split>": {metric: value}}`
entries, a top-level key

    "per_user": {"<split>": {"sample_index": [int, ...], "rank": [int, ...]}}

where `sample_index[u]` is the user's row index in that split of the data_prep dataset (so runs that
score the same seeded subset, `recipes.evaluation.sample_indices`, pair up) and `rank[u]` is the 1-based
rank of that user's target. Both lists have one entry per scored user; sample indices are distinct.
Files without the key stay valid: they simply get no intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rewards.ranking import hit_at_k, ndcg_at_k

KS = (5, 10, 20)
MEAN_RANK = "mean_rank"
# Monte Carlo error of a 2.5% percentile from 2000 resamples: about 2% of the interval's width.
RESAMPLES = 2000
LEVEL = 0.95
# Resamples drawn at once: their indices, offsets and counts take about 60 MB for 10,000 users.
CHUNK = 256

PerUser = dict[str, list[int]]  # {"sample_index": [...], "rank": [...]}: one split of the contract above


@dataclass(frozen=True)
class Interval:
    """A metric's value on the users scored and its bootstrap interval [low, high]."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (for a difference: a clear change)."""
        return self.low > 0 or self.high < 0


def metric_names(ks: Sequence[int] = KS) -> list[str]:
    """hit@K, then ndcg@K, each by increasing K, then mean_rank: the keys of every dict returned here."""
    return [f"hit@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + [MEAN_RANK]


def as_ranks(ranks: torch.Tensor | Sequence[int], name: str = "ranks") -> torch.Tensor:
    """(users,) int64 ranks, checked: one dimension, at least one user, every rank >= 1."""
    ranks = torch.as_tensor(ranks).long().cpu()
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(
            f"recipes/intervals.py: {name} must be a non-empty 1-D list of ranks, got {tuple(ranks.shape)}"
        )
    if int(ranks.min()) < 1:
        raise ValueError(f"recipes/intervals.py: {name} are 1-based, got a rank of {int(ranks.min())}")
    return ranks


def per_user_values(ranks: torch.Tensor | Sequence[int], ks: Sequence[int] = KS) -> dict[str, torch.Tensor]:
    """Each user's Hit@K, NDCG@K and rank, float64 `(users,)` each, keyed as `metric_names(ks)`."""
    ranks = as_ranks(ranks)
    values = {f"hit@{k}": hit_at_k(ranks, k).double() for k in ks}
    values.update({f"ndcg@{k}": ndcg_at_k(ranks, k).double() for k in ks})
    values[MEAN_RANK] = ranks.double()
    return values


def bootstrap_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, metrics) means of `values` (users, metrics) over users drawn with replacement.

    Each resample draws one set of user indices for all columns; it is applied as a count per user
    (how often that user was drawn), so the means are one matrix product instead of a gather.
    """
    users = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, CHUNK):
        rows = min(CHUNK, resamples - start)
        drawn = torch.randint(users, (rows, users), generator=generator)  # (rows, users)
        flat = drawn + torch.arange(rows).unsqueeze(1) * users
        counts = torch.bincount(flat.flatten(), minlength=rows * users).view(rows, users)
        means.append(counts.to(values.dtype) @ values / users)  # (rows, metrics)
    return torch.cat(means)


def percentile_intervals(
    values: Mapping[str, torch.Tensor], resamples: int, level: float, seed: int
) -> dict[str, Interval]:
    """Percentile bootstrap interval of the mean of each per-user column of `values` (same users)."""
    if resamples < 1:
        raise ValueError(f"recipes/intervals.py: resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"recipes/intervals.py: level must lie in (0, 1), got {level}")
    names = list(values)
    table = torch.stack([values[n] for n in names], dim=1)  # (users, metrics)
    means = bootstrap_means(table, resamples, seed)  # (resamples, metrics)
    tail = (1 - level) / 2
    bounds = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype), dim=0)  # (2, metrics)
    point = table.mean(dim=0)
    return {
        n: Interval(float(point[j]), float(bounds[0, j]), float(bounds[1, j])) for j, n in enumerate(names)
    }


def bootstrap_intervals(
    ranks: torch.Tensor | Sequence[int],
    ks: Sequence[int] = KS,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap over users of each metric's mean, keyed as `metric_names(ks)`."""
    return percentile_intervals(per_user_values(ranks, ks), resamples, level, seed)


def paired_differences(
    ranks_a: torch.Tensor | Sequence[int],
    ranks_b: torch.Tensor | Sequence[int],
    ks: Sequence[int] = KS,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Interval]:
    """Paired bootstrap of mean(b) - mean(a) for each metric, `ranks_a[u]` and `ranks_b[u]` the same user.

    Each resample draws user indices once and applies them to both runs; since a mean is linear that is
    the bootstrap of the per-user difference, which is how it is computed. b minus a: with a = before and
    b = after, a positive Hit/NDCG difference and a negative mean_rank difference are improvements.
    """
    a, b = as_ranks(ranks_a, "ranks_a"), as_ranks(ranks_b, "ranks_b")
    if a.numel() != b.numel():
        raise ValueError(
            f"recipes/intervals.py: paired differences need the same users in the same order, got "
            f"{a.numel()} ranks in ranks_a and {b.numel()} in ranks_b (align them with align_by_sample_index)"
        )
    values_a, values_b = per_user_values(a, ks), per_user_values(b, ks)
    differences = {n: values_b[n] - values_a[n] for n in values_a}
    return percentile_intervals(differences, resamples, level, seed)


# ---------------------------------------------------------------- per-user records


def per_user_record(sample_index: Sequence[int], ranks: torch.Tensor | Sequence[int]) -> PerUser:
    """One split's entry of the per-user contract, as plain JSON-ready ints."""
    record = {"sample_index": [int(i) for i in sample_index], "rank": [int(r) for r in as_ranks(ranks)]}
    return check_per_user(record, "per-user record")


def check_per_user(record: Any, where: str) -> PerUser:
    """`record` if it follows the per-user contract; a ValueError naming `where` and the field otherwise."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object with 'sample_index' and 'rank' lists")
    for key in ("sample_index", "rank"):
        column = record.get(key)
        if not isinstance(column, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in column
        ):
            raise ValueError(f"{where}.{key}: expected a list of integers")
    index, rank = record["sample_index"], record["rank"]
    if len(index) != len(rank):
        raise ValueError(f"{where}: 'sample_index' has {len(index)} entries but 'rank' has {len(rank)}")
    bad = next((u for u, r in enumerate(rank) if r < 1), None)
    if bad is not None:
        raise ValueError(f"{where}.rank[{bad}]: ranks are 1-based, got {rank[bad]}")
    bad = next((u for u, i in enumerate(index) if i < 0), None)
    if bad is not None:
        raise ValueError(f"{where}.sample_index[{bad}]: expected a row index >= 0, got {index[bad]}")
    if len(set(index)) != len(index):
        raise ValueError(f"{where}.sample_index: each user must appear once, found repeated indices")
    return {"sample_index": list(index), "rank": list(rank)}


@dataclass(frozen=True)
class Aligned:
    """Two runs' ranks on their common users, in increasing sample_index order."""

    sample_index: list[int]
    ranks_a: torch.Tensor  # (common,)
    ranks_b: torch.Tensor  # (common,)

    @property
    def common(self) -> int:
        return len(self.sample_index)


def align_by_sample_index(a: Mapping[str, list[int]], b: Mapping[str, list[int]]) -> Aligned:
    """The users both per-user records scored (intersection of sample_index, sorted), with their ranks."""
    rank_a = dict(zip(a["sample_index"], a["rank"], strict=True))
    rank_b = dict(zip(b["sample_index"], b["rank"], strict=True))
    common = sorted(rank_a.keys() & rank_b.keys())
    return Aligned(
        common,
        torch.tensor([rank_a[i] for i in common], dtype=torch.long),
        torch.tensor([rank_b[i] for i in common], dtype=torch.long),
    )


# ---------------------------------------------------------------- text


def format_value(value: float, metric: str, signed: bool = False) -> str:
    """Mean rank with one decimal, every other metric with four; `signed` adds + to positive values."""
    spec = ("+" if signed else "") + (".1f" if metric == MEAN_RANK else ".4f")
    return format(value, spec)


def format_interval(interval: Interval, metric: str, signed: bool = False) -> str:
    """`0.0450 [0.0200, 0.0750]`; mean rank `301.2 [280.1, 322.0]`; `signed` for differences."""
    low, high = format_value(interval.low, metric, signed), format_value(interval.high, metric, signed)
    return f"{format_value(interval.value, metric, signed)} [{low}, {high}]"


def format_difference(interval: Interval, metric: str) -> str:
    """A paired difference with its interval and whether it clears zero: `ndcg@20 +0.0120 [...] (excludes 0)`."""
    verdict = "excludes 0" if interval.excludes_zero() else "includes 0"
    return f"{metric} {format_interval(interval, metric, signed=True)} ({verdict})"
