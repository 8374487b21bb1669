"""Steps 4 and 6: item index over the catalog, and one sample per interaction after a user's first.

All of it is integer work over numpy arrays: a sort per user, then gather indices for the histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.filters import encode


@dataclass
class Samples:
    """Samples in (user, time) order. Histories are flat arrays cut by `offsets` (oldest first)."""

    user: np.ndarray  # (samples,) user code
    target: np.ndarray  # (samples,) item index
    timestamp: np.ndarray  # (samples,) target time, ms
    row: np.ndarray  # (samples,) file-order position of the target interaction
    offsets: np.ndarray  # (samples + 1,) history i is [offsets[i], offsets[i+1]) of the flat arrays
    history: np.ndarray  # (total history length,) item index
    history_timestamps: np.ndarray  # (total history length,) ms
    history_ratings: np.ndarray  # (total history length,)

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> Samples:
        """The samples at `index`, histories gathered along."""
        starts, ends = self.offsets[index], self.offsets[index + 1]
        flat = ranges(starts, ends - starts)
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        return Samples(
            user=self.user[index],
            target=self.target[index],
            timestamp=self.timestamp[index],
            row=self.row[index],
            offsets=offsets,
            history=self.history[flat],
            history_timestamps=self.history_timestamps[flat],
            history_ratings=self.history_ratings[flat],
        )


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


def index_catalog(interactions: pa.Table) -> tuple[np.ndarray, pa.Array]:
    """Item index per interaction, and the catalog's item ids: 0..N-1 in order of first appearance in time."""
    ts = interactions.column("timestamp").to_numpy()
    in_time = np.argsort(ts, kind="stable")  # ties keep file order
    codes, values = encode(interactions.column("item_id").take(pa.array(in_time)))
    index = np.empty(len(ts), dtype=np.int64)
    index[in_time] = codes
    return index, values


def build_samples(
    interactions: pa.Table, item_index: np.ndarray, window_size: int
) -> tuple[Samples, pa.Array, dict[str, Any]]:
    """Every interaction after a user's first is a sample; its history is the up to `window_size` before it.

    Returns the samples, the user ids by user code, and counters.
    """
    users, user_ids = encode(interactions.column("user_id"))
    ts = interactions.column("timestamp").to_numpy()
    ratings = interactions.column("rating").to_numpy()
    order = np.lexsort((np.arange(len(ts)), ts, users))  # per user, by time, then file order
    sorted_users = users[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_users[1:] != sorted_users[:-1]
    position = np.arange(len(order))
    user_start = np.maximum.accumulate(np.where(first, position, 0))
    at = np.flatnonzero(~first)  # positions (in sorted order) of the targets
    history_start = np.maximum(user_start[at], at - window_size)
    lengths = at - history_start
    offsets = np.zeros(len(at) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = order[ranges(history_start, lengths)]
    samples = Samples(
        user=sorted_users[at],
        target=item_index[order[at]],
        timestamp=ts[order[at]],
        row=order[at],
        offsets=offsets,
        history=item_index[flat],
        history_timestamps=ts[flat],
        history_ratings=ratings[flat],
    )
    counters = {
        "users": len(user_ids),
        "users_with_one_interaction": int((np.bincount(users) == 1).sum()),
        "samples": len(samples),
        "mean_history_length": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
    }
    return samples, user_ids, counters
