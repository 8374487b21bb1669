"""The results file of a run and its printed table."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_FILE = "results.json"


def split_metrics(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"valid/hit@5": x, ...} -> {"valid": {"hit@5": x, ...}, ...}, metrics only (hit@K / ndcg@K)."""
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        split, _, metric = key.partition("/")
        if metric.startswith(("hit@", "ndcg@")):
            nested.setdefault(split, {})[metric] = float(value)
    return nested


def write_results(output_dir: str, after: dict[str, float], before: dict[str, float] | None = None) -> dict:
    """results.json holds the final metrics; results_before.json the untrained model's, when measured."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = split_metrics(after)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    if before:
        (out / "results_before.json").write_text(json.dumps(split_metrics(before), indent=2) + "\n")
    return results


def format_table(after: dict[str, float], before: dict[str, float] | None = None) -> str:
    after_n, before_n = split_metrics(after), split_metrics(before or {})
    metrics = ["hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20"]
    lines = [f"{'split':<8}{'':<8}" + "".join(f"{m:>10}" for m in metrics) + f"{'mean rank':>11}"]

    def row(split: str, label: str, nested: dict, flat: dict) -> str:
        rank = flat.get(f"{split}/mean_rank")
        return (
            f"{split:<8}{label:<8}"
            + "".join(f"{nested[split].get(m, 0):>10.4f}" for m in metrics)
            + (f"{rank:>11.1f}" if rank is not None else f"{'':>11}")
        )

    for split in after_n:
        if split in before_n:
            lines.append(row(split, "before", before_n, before or {}))
        lines.append(row(split, "after", after_n, after))
    return "\n".join(lines)
