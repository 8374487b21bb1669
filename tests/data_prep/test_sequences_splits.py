import numpy as np
import pyarrow as pa

from data_prep.sequences import build_samples, index_catalog
from data_prep.splits import leave_last_out_split, temporal_split


def _log(rows):
    users, items, ts = zip(*rows, strict=True)
    return pa.table(
        {"user_id": list(users), "item_id": list(items), "rating": [4.0] * len(rows), "timestamp": list(ts)}
    )


def _histories(samples):
    return [
        samples.history[samples.offsets[i] : samples.offsets[i + 1]].tolist() for i in range(len(samples))
    ]


def test_catalog_index_follows_first_appearance_in_time():
    index, ids = index_catalog(_log([("u", "b", 5), ("v", "a", 1), ("u", "c", 1), ("v", "b", 9)]))
    assert ids.to_pylist() == ["a", "c", "b"]  # a and c tie at t=1: file order
    assert index.tolist() == [2, 0, 1, 2]


def test_every_interaction_after_a_users_first_is_a_sample_with_the_items_before_it():
    log = _log([("u", "x", 3), ("u", "y", 1), ("v", "x", 2), ("u", "z", 2)])
    index, _ = index_catalog(log)  # y=0, x=1, z=2
    samples, user_ids, counters = build_samples(log, index, window_size=20)
    assert samples.target.tolist() == [2, 1] and _histories(samples) == [[0], [0, 2]]
    assert counters["users_with_one_interaction"] == 1
    assert user_ids.take(pa.array(samples.user)).to_pylist() == ["u", "u"]


def test_history_keeps_only_the_last_window_size_items():
    log = _log([("u", f"i{k}", k) for k in range(6)])
    index, _ = index_catalog(log)
    samples, _, _ = build_samples(log, index, window_size=2)
    assert _histories(samples) == [[0], [0, 1], [1, 2], [2, 3], [3, 4]]
    assert samples.history_timestamps[samples.offsets[-2] :].tolist() == [3, 4]


def test_temporal_split_sizes_are_floor_80_and_90_percent():
    log = _log([("u", f"i{k}", k) for k in range(24)])  # 23 samples
    index, _ = index_catalog(log)
    samples, _, _ = build_samples(log, index, window_size=20)
    parts = temporal_split(samples)
    assert [len(parts[p]) for p in ("train", "valid", "test")] == [18, 2, 3]  # floor(18.4), floor(20.7)-18
    times = [samples.timestamp[parts[p]] for p in ("train", "valid", "test")]
    assert times[0].max() <= times[1].min() and times[1].max() <= times[2].min()


def test_temporal_split_keeps_file_order_for_equal_target_times():
    log = _log([("u", "a", 0), ("v", "a", 0), ("v", "b", 5), ("u", "b", 5)])
    index, _ = index_catalog(log)
    samples, _, _ = build_samples(log, index, window_size=20)
    order = np.concatenate([temporal_split(samples)[p] for p in ("train", "valid", "test")])
    assert samples.row[order].tolist() == [2, 3]


def test_leave_last_out_puts_each_users_last_sample_in_test_and_the_one_before_in_valid():
    log = _log([("u", f"i{k}", k) for k in range(5)] + [("v", "i0", 1), ("v", "i1", 2)])
    index, _ = index_catalog(log)
    samples, _, _ = build_samples(log, index, window_size=20)
    parts = leave_last_out_split(samples)
    assert samples.timestamp[parts["test"]].tolist() == [4]
    assert samples.timestamp[parts["valid"]].tolist() == [3]
    assert sorted(samples.timestamp[parts["train"]].tolist()) == [1, 2, 2]  # v has too few samples: all train


def test_take_gathers_histories_along_with_samples():
    log = _log([("u", f"i{k}", k) for k in range(4)])
    index, _ = index_catalog(log)
    samples, _, _ = build_samples(log, index, window_size=20)
    picked = samples.take(np.array([2, 0]))
    assert _histories(picked) == [[0, 1, 2], [0]]
