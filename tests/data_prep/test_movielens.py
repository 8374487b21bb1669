"""The embedded default end to end: `python -m data_prep movielens` and the dataset's invariants."""

import json

import datasets
import numpy as np
import pyarrow.compute as pc
import pytest

from data_prep.__main__ import main
from data_prep.prompts import ANSWER_MARKER


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    assert main(["movielens", "--out", str(out)]) == 0
    return datasets.load_from_disk(str(out)), json.loads((out / "stats.json").read_text())


def test_movielens_has_the_expected_size(movielens):
    data, stats = movielens
    assert (stats["summary"]["users"], stats["summary"]["items"], stats["summary"]["interactions"]) == (
        943,
        1682,
        100000,
    )
    n = sum(data[s].num_rows for s in ("train", "valid", "test"))
    assert n == 100000 - 943 and data["train"].num_rows == int(0.8 * n)


def _column(data, split, name):
    return data[split].data.column(name).combine_chunks()


def test_no_sample_target_is_in_its_own_history(movielens):
    data, _ = movielens
    for split in ("train", "valid", "test"):
        history = _column(data, split, "history")
        owner = pc.list_parent_indices(history).to_numpy()
        targets = _column(data, split, "target").to_numpy()
        assert not np.any(pc.list_flatten(history).to_numpy() == targets[owner])


def test_valid_targets_follow_train_and_test_targets_follow_valid(movielens):
    data, _ = movielens
    times = {s: _column(data, s, "timestamp").to_numpy() for s in ("train", "valid", "test")}
    assert times["valid"].min() >= times["train"].max()
    assert times["test"].min() >= times["valid"].max()


def test_item_indices_are_within_the_catalog(movielens):
    data, _ = movielens
    n_items = data["items"].num_rows
    assert _column(data, "items", "item_index").to_pylist() == list(range(n_items))
    for split in ("train", "valid", "test"):
        flat = np.concatenate(
            [np.asarray(h) for h in data[split]["history"]] + [np.asarray(data[split]["target"])]
        )
        assert flat.min() >= 0 and flat.max() < n_items


def test_history_is_oldest_first_and_before_its_target(movielens):
    data, _ = movielens
    sample = data["test"][0]
    assert sample["history_timestamps"] == sorted(sample["history_timestamps"])
    assert sample["history_timestamps"][-1] <= sample["timestamp"] and len(sample["history"]) == 20


def test_prompts_carry_titles_and_the_marker(movielens):
    data, _ = movielens
    sample, item = data["train"][100], data["items"][0]
    user_text = sample["prompt"][-1]["content"]
    titles = data["items"].select(sample["history"])["title"]
    assert all(t in user_text for t in titles) and ANSWER_MARKER in user_text
    assert item["prompt"][-1] == {"role": "assistant", "content": ANSWER_MARKER}
    assert item["title"] in item["prompt"][1]["content"]
