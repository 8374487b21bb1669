"""Steps 2 and 3: keep interactions of surviving items, drop repeated pairs, time window, k-core.

Each step takes the interactions table in file order and returns the kept rows (still in file order)
with its counters. Row masks are computed with numpy over integer codes, never row by row.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import EmptyResultError


def encode(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes (int64) and the distinct values, numbered in order of first appearance."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


def _filter(table: pa.Table, keep: np.ndarray) -> pa.Table:
    return table.filter(pa.array(keep))


def keep_known_items(interactions: pa.Table, item_ids: pa.Array) -> tuple[pa.Table, dict[str, Any]]:
    """Keep interactions whose item survived cleaning (and exists in the metadata at all)."""
    keep = pc.is_in(interactions.column("item_id"), value_set=item_ids)
    kept = interactions.filter(keep)
    counters = {
        "interactions_in": interactions.num_rows,
        "item_dropped_or_unknown": interactions.num_rows - kept.num_rows,
        "interactions_out": kept.num_rows,
    }
    return kept, counters


def drop_repeated_pairs(interactions: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Keep each (user, item) pair once: its earliest interaction, ties broken by file order."""
    users, _ = encode(interactions.column("user_id"))
    items, item_values = encode(interactions.column("item_id"))
    key = users * max(len(item_values), 1) + items
    order = np.lexsort((interactions.column("timestamp").to_numpy(), key))  # stable: ties keep file order
    sorted_key = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[first]] = True
    kept = _filter(interactions, keep)
    return kept, {
        "interactions_in": len(keep),
        "repeated_pairs": int((~keep).sum()),
        "interactions_out": kept.num_rows,
    }


def time_window(
    interactions: pa.Table, start_ms: int | None, end_ms: int | None
) -> tuple[pa.Table, dict[str, Any]]:
    """Keep interactions with start <= timestamp < end (either bound may be None)."""
    ts = interactions.column("timestamp").to_numpy()
    before = ts < start_ms if start_ms is not None else np.zeros(len(ts), dtype=bool)
    after = ts >= end_ms if end_ms is not None else np.zeros(len(ts), dtype=bool)
    kept = _filter(interactions, ~(before | after))
    counters = {
        "interactions_in": len(ts),
        "before_start": int(before.sum()),
        "at_or_after_end": int(after.sum()),
        "interactions_out": kept.num_rows,
    }
    return kept, counters


def k_core(interactions: pa.Table, k: int) -> tuple[pa.Table, dict[str, Any]]:
    """Iteratively drop users and items with fewer than k interactions until none is left (k=0: off)."""
    n = interactions.num_rows
    if k <= 0:
        return interactions, {"k": k, "rounds": 0, "interactions_in": n, "interactions_out": n}
    users, _ = encode(interactions.column("user_id"))
    items, _ = encode(interactions.column("item_id"))
    keep = np.ones(n, dtype=bool)
    rounds = 0
    while True:
        user_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        weak = keep & ((user_count[users] < k) | (item_count[items] < k))
        if not weak.any():
            break
        keep &= ~weak
        rounds += 1
    kept = _filter(interactions, keep)
    return kept, {"k": k, "rounds": rounds, "interactions_in": n, "interactions_out": kept.num_rows}


def months_back(ms: int, months: int) -> int:
    """The same UTC time `months` earlier, the day clamped to the target month's length."""
    day = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    year, month0 = divmod(day.year * 12 + day.month - 1 - months, 12)
    dom = min(day.day, calendar.monthrange(year, month0 + 1)[1])
    return int(day.replace(year=year, month=month0 + 1, day=dom).timestamp() * 1000)


def window_and_core(
    interactions: pa.Table, start_ms: int | None, end_ms: int | None, k: int, min_items: int
) -> tuple[pa.Table, dict[str, Any]]:
    """Time window then k-core; with min_items, move the start back 3 months until enough items remain."""
    earliest = pc.min(interactions.column("timestamp")).as_py() if interactions.num_rows else None
    widened = 0
    while True:
        kept, window_counters = time_window(interactions, start_ms, end_ms)
        kept, core_counters = k_core(kept, k)
        n_items = pc.count_distinct(kept.column("item_id")).as_py() if kept.num_rows else 0
        if (
            not min_items
            or n_items >= min_items
            or earliest is None
            or start_ms is None
            or start_ms <= earliest
        ):
            break
        start_ms = months_back(start_ms, 3)
        widened += 1
    window_counters.update(
        start_ms=start_ms,
        end_ms=end_ms,
        widened_by_3_months=widened,
        items_in_window=n_items,
    )
    if kept.num_rows == 0:
        raise EmptyResultError(
            "window/k-core",
            f"no interaction is left between start={start_ms} and end={end_ms} (ms) with k-core {k}; "
            "check --start/--end/--kcore against the data's time range",
        )
    return kept, {"window": window_counters, "kcore": core_counters}
