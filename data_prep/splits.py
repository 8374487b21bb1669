"""Step 5: split samples into train / valid / test, returning index arrays into the samples."""

from __future__ import annotations

import numpy as np

from data_prep.sequences import Samples

SPLITS = ("train", "valid", "test")


def temporal_split(samples: Samples, train: float = 0.8, valid: float = 0.1) -> dict[str, np.ndarray]:
    """Sort by target time (ties: file order); first floor(0.8n) train, up to floor(0.9n) valid, rest test."""
    order = np.lexsort((samples.row, samples.timestamp))
    n = len(order)
    cut_train, cut_valid = int(np.floor(train * n)), int(np.floor((train + valid) * n))
    return {"train": order[:cut_train], "valid": order[cut_train:cut_valid], "test": order[cut_valid:]}


def leave_last_out_split(samples: Samples) -> dict[str, np.ndarray]:
    """Per user: last sample test, the one before valid, the rest train; users with < 3 samples: all train.

    Each split is then in target-time order (ties: file order).
    """
    users = samples.user  # samples are grouped by user, in time order within a user
    n = len(users)
    last = np.ones(n, dtype=bool)
    last[:-1] = users[:-1] != users[1:]
    user_end = np.flatnonzero(last)
    counts = np.diff(np.concatenate(([-1], user_end)))
    from_end = np.repeat(user_end, counts) - np.arange(n)  # 0 for a user's last sample
    eligible = np.repeat(counts >= 3, counts)
    part = np.where(eligible & (from_end == 0), 2, np.where(eligible & (from_end == 1), 1, 0))
    order = np.lexsort((samples.row, samples.timestamp))
    return {name: order[part[order] == k] for k, name in enumerate(SPLITS)}


def split_samples(samples: Samples, how: str) -> dict[str, np.ndarray]:
    if how == "temporal":
        return temporal_split(samples)
    if how == "leave-last-out":
        return leave_last_out_split(samples)
    raise ValueError(f"unknown split {how!r}; expected 'temporal' or 'leave-last-out'")
