"""Baselines: popularity against a hand-computed case, SASRec on a planted next-item pattern."""

from __future__ import annotations

import json
import math
import random

import pytest
from datasets import Dataset, DatasetDict

from recipes import baselines


def make_dataset(train: list[tuple[list[int], int]], valid, test, num_items: int) -> DatasetDict:
    """A DatasetDict in the data_prep contract, built by hand from (history, target) pairs."""

    def samples(pairs: list[tuple[list[int], int]], t0: int) -> Dataset:
        return Dataset.from_dict(
            {
                "user_id": [f"u{i}" for i in range(len(pairs))],
                "history": [h for h, _ in pairs],
                "target": [t for _, t in pairs],
                "timestamp": [t0 + i for i in range(len(pairs))],
                "history_timestamps": [[t0 - len(h) + j for j in range(len(h))] for h, _ in pairs],
                "history_ratings": [[4.0] * len(h) for h, _ in pairs],
                "prompt": [[{"role": "user", "content": "history"}] for _ in pairs],
            }
        )

    items = Dataset.from_dict(
        {
            "item_index": list(range(num_items)),
            "item_id": [f"i{i}" for i in range(num_items)],
            "title": [f"Item {i}" for i in range(num_items)],
            "description": [""] * num_items,
            "categories": [[] for _ in range(num_items)],
        }
    )
    return DatasetDict(
        train=samples(train, 1_000), valid=samples(valid, 2_000), test=samples(test, 3_000), items=items
    )


@pytest.fixture
def popularity_data(tmp_path):
    # 8 items; item k is the target of 7 - k train samples: counts 7, 6, 5, 4, 3, 2, 1, 0.
    train = [([(k + 1) % 8], k) for k in range(8) for _ in range(7 - k)]
    test = [
        ([0], 1),  # item 0 masked; item 1 (6) is the most popular left: rank 1
        ([2, 3], 7),  # 2, 3 masked; 0, 1, 4, 5, 6 all outscore item 7 (0): rank 6
        ([5], 2),  # 0 (7) and 1 (6) outscore item 2 (5): rank 3
    ]
    valid = [([1], 0)]  # item 0 is the most popular: rank 1
    path = tmp_path / "tiny"
    make_dataset(train, valid, test, num_items=8).save_to_disk(str(path))
    return path


def test_popularity_matches_hand_computed_metrics(popularity_data, tmp_path):
    out = tmp_path / "pop.json"
    results = baselines.main(["popularity", "--data", str(popularity_data), "--out", str(out)])
    # ranks 1, 6, 3: Hit@5 = 2/3, Hit@10 = Hit@20 = 1
    # NDCG@5 = (1/log2(2) + 0 + 1/log2(4)) / 3 = (1 + 0.5) / 3 = 0.5
    # NDCG@10 = NDCG@20 = (1 + 1/log2(7) + 0.5) / 3
    expected = {
        "hit@5": 2 / 3,
        "hit@10": 1.0,
        "hit@20": 1.0,
        "ndcg@5": 0.5,
        "ndcg@10": (1.5 + 1 / math.log2(7)) / 3,
        "ndcg@20": (1.5 + 1 / math.log2(7)) / 3,
    }
    assert results["test"] == pytest.approx(expected, abs=1e-6)
    assert results["valid"] == pytest.approx({k: 1.0 for k in expected})
    assert json.loads(out.read_text()) == results


def test_popularity_out_file_holds_each_users_row_and_rank(popularity_data, tmp_path):
    out = tmp_path / "pop.json"
    baselines.main(["popularity", "--data", str(popularity_data), "--out", str(out)])
    per_user = json.loads(out.read_text())["per_user"]
    assert per_user == {
        "valid": {"sample_index": [0], "rank": [1]},
        "test": {"sample_index": [0, 1, 2], "rank": [1, 6, 3]},  # the hand-computed ranks above
    }


def test_max_users_per_user_indices_are_the_seeded_subset_rows(popularity_data):
    from recipes.evaluation import sample_indices

    results = baselines.main(
        ["popularity", "--data", str(popularity_data), "--max-users", "2", "--seed", "3"]
    )
    test = results["per_user"]["test"]
    assert test["sample_index"] == sample_indices(3, 2, 3) == [0, 2]  # rows 0 and 2, not the first two
    assert test["rank"] == [1, 3]  # their ranks in the full split


def test_popularity_table_prints_intervals(popularity_data, capsys):
    baselines.main(["popularity", "--data", str(popularity_data), "--split", "test"])
    printed = capsys.readouterr().out
    assert "95% bootstrap intervals over users" in printed and "test (3 users)" in printed
    assert "mean rank  3.3 [" in printed  # ranks 1, 6, 3


def test_popularity_split_option_scores_only_that_split(popularity_data):
    results = baselines.main(["popularity", "--data", str(popularity_data), "--split", "test"])
    assert set(results) == {"test", "per_user"} and list(results["per_user"]) == ["test"]


def test_popularity_counts_only_train_targets():
    train = baselines.Split(histories=[[3, 3, 3], [3]], targets=[1, 1])
    assert baselines.popularity_scores(train, 4).tolist() == [0.0, 2.0, 0.0, 0.0]


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        baselines.main(["popularity", "--data", str(tmp_path / "nope")])


def planted_split(num_items: int, count: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """Item i is always followed by item i + 1 (mod num_items); random starts and lengths."""
    pairs = []
    for _ in range(count):
        start, length = rng.randrange(num_items), rng.randint(1, 6)
        seq = [(start + j) % num_items for j in range(length + 1)]
        pairs.append((seq[:-1], seq[-1]))
    return pairs


def test_sasrec_learns_planted_successor_pattern_far_above_popularity(tmp_path):
    rng = random.Random(0)
    n = 40
    path = tmp_path / "planted"
    data = make_dataset(planted_split(n, 600, rng), planted_split(n, 100, rng), planted_split(n, 100, rng), n)
    data.save_to_disk(str(path))
    tiny = [
        "--hidden-size",
        "32",
        "--num-blocks",
        "1",
        "--max-len",
        "8",
        "--dropout",
        "0.1",
        "--threads",
        "1",
    ]
    train = ["--epochs", "8", "--batch-size", "64", "--lr", "5e-3", "--patience", "3"]
    sasrec = baselines.main(["sasrec", "--data", str(path), *tiny, *train])
    popularity = baselines.main(["popularity", "--data", str(path)])
    for split in ("valid", "test"):
        assert sasrec[split]["hit@5"] >= 0.9
        assert sasrec[split]["ndcg@10"] >= 0.7
        assert popularity[split]["hit@5"] < 0.4


def test_training_tensors_label_each_position_with_its_next_item():
    from recipes.sasrec import training_tensors

    inputs, labels = training_tensors([[1, 2, 3], [4]], [5, 6], max_len=4, pad=9)
    assert inputs.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]]
    assert labels.tolist() == [[1, 2, 3, 5], [9, 9, 4, 6]]


def test_sasrec_is_deterministic_for_a_seed(popularity_data):
    args = ["sasrec", "--data", str(popularity_data), "--hidden-size", "16", "--epochs", "2", "--seed", "7"]
    assert baselines.main(args) == baselines.main(args)


def test_target_outside_catalog_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "bad"
    make_dataset([([0], 1)], [([0], 1)], [([0], 9)], num_items=3).save_to_disk(str(path))
    with pytest.raises(SystemExit, match=r"test row 0: target 9 is outside the catalog \[0, 3\)"):
        baselines.main(["popularity", "--data", str(path)])


# ------------------------------------------------------------------ recent popularity

DAY = baselines.MS_PER_DAY


def test_recent_popularity_counts_the_last_days_and_breaks_ties_by_all_time_counts():
    # Item 0: 3 targets long ago; item 1: 1 target on the last day; item 2: 2 targets, one 2 days before the end.
    targets = [0, 0, 0, 1, 2, 2]
    times = [0, 0, 0, 10 * DAY, 8 * DAY, 0]
    scores = baselines.recent_popularity_scores(targets, times, 4, window_days=3)
    # Recent counts 0, 1, 1, 0, plus the all-time counts 3, 1, 2, 0 over (3 + 1): a tie-break below 1.
    assert scores.tolist() == pytest.approx([0 + 3 / 4, 1 + 1 / 4, 1 + 2 / 4, 0.0])
    assert baselines.recent_popularity_scores(targets, times, 4, window_days=100).argmax().item() == 0


def test_recent_popularity_chooses_its_window_on_valid(tmp_path):
    # Item 0 was popular early in train, item 1 late; valid and test ask for item 1: a short window wins.
    train = [([2], 0)] * 6 + [([2], 1)] * 2
    data = make_dataset(train, valid=[([2], 1)] * 3, test=[([0], 1), ([2], 0)], num_items=3)
    # make_dataset spaces train targets 1 ms apart; spread them over days instead (item 1's last).
    data["train"] = data["train"].map(lambda row, i: {"timestamp": i * DAY}, with_indices=True)
    path = tmp_path / "drift"
    data.save_to_disk(str(path))
    out = tmp_path / "recent.json"
    results = baselines.main(
        ["recent-popularity", "--data", str(path), "--windows", "1,30", "--out", str(out)]
    )
    choice = json.loads(out.read_text())["recent_popularity"]
    assert choice["window_days"] == 1.0  # last 1 day: item 1 leads; 30 days: item 0 (6 of 8) leads
    assert choice["valid_ndcg@10_by_window"] == pytest.approx({"1": 1.0, "30": 1 / math.log2(3)})
    # test: the first user has item 0 in its history, so item 1 is first either way; the second asks for item 0,
    # which the 1-day window ranks after item 1 (history item 2 masked): rank 2.
    assert results["test"]["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(3)) / 2)


def test_recent_popularity_windows_must_be_positive_days(popularity_data):
    with pytest.raises(SystemExit, match="positive numbers of days"):
        baselines.main(["recent-popularity", "--data", str(popularity_data), "--windows", "7,-1"])
