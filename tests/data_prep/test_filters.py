import pyarrow as pa
import pytest

from data_prep.errors import EmptyResultError
from data_prep.filters import (
    drop_repeated_pairs,
    k_core,
    keep_known_items,
    months_back,
    time_window,
    window_and_core,
)
from data_prep.options import date_to_ms


def _log(rows):
    users, items, ts = zip(*rows, strict=True)
    return pa.table(
        {
            "user_id": list(users),
            "item_id": list(items),
            "rating": [float(k) for k in range(len(rows))],
            "timestamp": list(ts),
        }
    )


def test_keep_known_items_drops_interactions_of_unknown_items():
    kept, counters = keep_known_items(_log([("u", "a", 1), ("u", "zz", 2)]), pa.array(["a"]))
    assert kept.column("item_id").to_pylist() == ["a"] and counters["item_dropped_or_unknown"] == 1


def test_repeated_pair_keeps_the_earliest_interaction():
    kept, counters = drop_repeated_pairs(_log([("u", "a", 5), ("u", "b", 1), ("u", "a", 2), ("v", "a", 9)]))
    assert kept.column("timestamp").to_pylist() == [1, 2, 9] and counters["repeated_pairs"] == 1


def test_repeated_pair_with_equal_times_keeps_the_first_in_file_order():
    kept, _ = drop_repeated_pairs(_log([("u", "a", 5), ("u", "a", 5)]))
    assert kept.column("rating").to_pylist() == [0.0]


def test_time_window_is_closed_at_start_and_open_at_end():
    kept, counters = time_window(
        _log([("u", "a", 9), ("u", "b", 10), ("u", "c", 19), ("u", "d", 20)]), 10, 20
    )
    assert kept.column("item_id").to_pylist() == ["b", "c"]
    assert (counters["before_start"], counters["at_or_after_end"]) == (1, 1)


def test_k_core_iterates_until_every_user_and_item_has_k():
    # dropping item c leaves user w with one interaction, which then drops w and item d
    rows = [
        ("u", "a", 1),
        ("u", "b", 2),
        ("v", "a", 3),
        ("v", "b", 4),
        ("w", "c", 5),
        ("w", "d", 6),
        ("x", "d", 7),
    ]
    kept, counters = k_core(_log(rows), 2)
    assert set(kept.column("user_id").to_pylist()) == {"u", "v"} and counters["rounds"] >= 2


def test_k_core_zero_keeps_everything():
    log = _log([("u", "a", 1)])
    assert k_core(log, 0)[0].num_rows == 1


def test_months_back_clamps_to_the_end_of_the_month():
    assert months_back(date_to_ms("2023-05-31", "x"), 3) == date_to_ms("2023-02-28", "x")
    assert months_back(date_to_ms("2023-01-15", "x"), 3) == date_to_ms("2022-10-15", "x")


def test_min_items_widens_the_window_backwards_in_3_month_steps():
    d = lambda s: date_to_ms(s, "x")  # noqa: E731
    log = _log([("u", "a", d("2022-01-05")), ("u", "b", d("2022-07-05")), ("u", "c", d("2022-10-05"))])
    kept, stats = window_and_core(log, d("2022-10-01"), None, k=0, min_items=2)
    assert kept.column("item_id").to_pylist() == ["b", "c"]
    assert stats["window"]["widened_by_3_months"] == 1 and stats["window"]["start_ms"] == d("2022-07-01")


def test_window_that_keeps_nothing_is_a_clear_error():
    with pytest.raises(EmptyResultError, match="no interaction is left"):
        window_and_core(_log([("u", "a", 5)]), 10, 20, k=0, min_items=0)
