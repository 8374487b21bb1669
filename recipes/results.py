"""The results file of a run and its printed table.

`results.json` (and `results_before.json`, the untrained model's) holds `{"<split>": {metric: value}}` and,
when the per-user ranks are given, the `"per_user"` key of the contract in `recipes/intervals.py`, from
which `recipes.report` computes bootstrap intervals and paired comparisons.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from recipes.intervals import (
    LEVEL,
    MEAN_RANK,
    RESAMPLES,
    Interval,
    PerUser,
    align_by_sample_index,
    bootstrap_intervals,
    check_per_user,
    format_difference,
    format_interval,
    paired_differences,
)

RESULTS_FILE = "results.json"
BEFORE_FILE = "results_before.json"
TABLE_METRICS = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20")
# The paired before -> after line of the printed table: the metric that moves first and the headline one.
PAIRED_METRICS = (MEAN_RANK, "ndcg@20")

PerUserSplits = Mapping[str, PerUser]  # split -> {"sample_index": [...], "rank": [...]}


def split_metrics(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"valid/hit@5": x, ...} -> {"valid": {"hit@5": x, ...}, ...}, metrics only (hit@K / ndcg@K)."""
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        split, _, metric = key.partition("/")
        if metric.startswith(("hit@", "ndcg@")):
            nested.setdefault(split, {})[metric] = float(value)
    return nested


def results_document(flat: dict[str, float], per_user: PerUserSplits | None = None) -> dict:
    """What a results file holds: the nested metrics, plus "per_user" when the ranks are given."""
    document: dict = split_metrics(flat)
    if per_user:
        document["per_user"] = {
            split: check_per_user(record, f"per_user.{split}") for split, record in per_user.items()
        }
    return document


def write_results(
    output_dir: str,
    after: dict[str, float],
    before: dict[str, float] | None = None,
    per_user_after: PerUserSplits | None = None,
    per_user_before: PerUserSplits | None = None,
) -> dict:
    """results.json holds the final metrics; results_before.json the untrained model's, when measured.

    Returns what results.json holds.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = results_document(after, per_user_after)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    if before:
        document = results_document(before, per_user_before)
        (out / BEFORE_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return results


def format_table(
    after: dict[str, float],
    before: dict[str, float] | None = None,
    per_user_after: PerUserSplits | None = None,
    per_user_before: PerUserSplits | None = None,
) -> str:
    """Before/after metrics per split; with per-user ranks, 95% intervals and the paired change."""
    if per_user_after or per_user_before:
        return interval_table(after, before or {}, per_user_after or {}, per_user_before or {})
    after_n, before_n = split_metrics(after), split_metrics(before or {})
    lines = [f"{'split':<8}{'':<8}" + "".join(f"{m:>10}" for m in TABLE_METRICS) + f"{'mean rank':>11}"]

    def row(split: str, label: str, nested: dict, flat: dict) -> str:
        rank = flat.get(f"{split}/mean_rank")
        return (
            f"{split:<8}{label:<8}"
            + "".join(f"{nested[split].get(m, 0):>10.4f}" for m in TABLE_METRICS)
            + (f"{rank:>11.1f}" if rank is not None else f"{'':>11}")
        )

    for split in after_n:
        if split in before_n:
            lines.append(row(split, "before", before_n, before or {}))
        lines.append(row(split, "after", after_n, after))
    return "\n".join(lines)


def cell(
    flat: dict[str, float], intervals: Mapping[str, dict[str, Interval]], split: str, metric: str
) -> str:
    """The value with its 95% interval when the split has per-user ranks, else the value alone."""
    if split in intervals:
        return format_interval(intervals[split][metric], metric)
    value = flat.get(f"{split}/{metric}")
    if value is None:
        return ""
    return f"{value:.1f}" if metric == MEAN_RANK else f"{value:.4f}"


def paired_line(split: str, before: PerUser, after: PerUser) -> str:
    """The paired after - before change of the users both evaluations scored."""
    aligned = align_by_sample_index(before, after)
    if aligned.common == 0:
        return f"{split:<8}after - before: no user in common"
    changes = paired_differences(aligned.ranks_a, aligned.ranks_b)
    text = ", ".join(format_difference(changes[m], m) for m in PAIRED_METRICS)
    return f"{split:<8}after - before, paired on {aligned.common} users: {text}"


def interval_table(
    after: dict[str, float],
    before: dict[str, float],
    per_user_after: PerUserSplits,
    per_user_before: PerUserSplits,
) -> str:
    """One row per split and metric, a column each for before and after: value [95% bootstrap interval]."""
    splits = list(dict.fromkeys([*split_metrics(after), *per_user_after]))
    has_before = bool(before) or bool(per_user_before)
    columns = ["before", "after"] if has_before else ["after"]
    lines = [
        f"{LEVEL:.0%} percentile bootstrap intervals over users ({RESAMPLES} resamples)",
        f"{'split':<8}{'metric':<11}" + "".join(f"{c:<26}" for c in columns).rstrip(),
    ]
    after_iv = {s: bootstrap_intervals(record["rank"]) for s, record in per_user_after.items()}
    before_iv = {s: bootstrap_intervals(record["rank"]) for s, record in per_user_before.items()}
    for split in splits:
        for metric in [*TABLE_METRICS, MEAN_RANK]:
            cells = [cell(after, after_iv, split, metric)]
            if has_before:
                cells.insert(0, cell(before, before_iv, split, metric))
            if any(cells):
                label = "mean rank" if metric == MEAN_RANK else metric
                lines.append(f"{split:<8}{label:<11}" + "".join(f"{c:<26}" for c in cells).rstrip())
        if split in per_user_before and split in per_user_after:
            lines.append(paired_line(split, per_user_before[split], per_user_after[split]))
    return "\n".join(lines)
