import gzip
import json

import datasets
import pytest

from data_prep.__main__ import main
from tests.data_prep.conftest import review_2023, small_log, write_jsonl

SAMPLE_COLUMNS = [
    "user_id",
    "history",
    "target",
    "timestamp",
    "history_timestamps",
    "history_ratings",
    "prompt",
]
ITEM_COLUMNS = [
    "item_index",
    "item_id",
    "title",
    "description",
    "categories",
    "average_rating",
    "rating_number",
    "prompt",
]


def _prep(tmp_path, *args):
    out = tmp_path / "out"
    return main([*args, "--out", str(out)]), out


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "csv"])
def test_amazon2023_local_files_give_the_output_contract(tmp_path, amazon2023_files, kind):
    status, out = _prep(
        tmp_path,
        "amazon2023",
        "--reviews",
        str(amazon2023_files[kind]),
        "--meta",
        str(amazon2023_files["meta"]),
    )
    assert status == 0
    data = datasets.load_from_disk(str(out))
    assert set(data) == {"train", "valid", "test", "items"}
    assert data["train"].column_names == SAMPLE_COLUMNS and data["items"].column_names == ITEM_COLUMNS
    assert [data[s].num_rows for s in ("train", "valid", "test")] == [12, 2, 2]
    assert data["items"]["item_id"] == ["IA", "IB", "IC", "ID", "IE", "IF"]
    assert data["items"]["title"][:3] == ["Café Racer & Friends", "Space Odyssey 2", "Ünïcödé Quest 日本"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["repeated_pairs"]["repeated_pairs"] == 1
    assert stats["known_items"]["item_dropped_or_unknown"] == 1
    assert stats["sequences"]["users_with_one_interaction"] == 1
    assert stats["clean_items"]["missing_title"] == 1


def test_amazon2018_files_give_the_same_samples_as_2023(tmp_path, amazon2023_files, amazon2018_files):
    old_args = [
        "amazon2018",
        "--reviews",
        str(amazon2018_files["reviews"]),
        "--meta",
        str(amazon2018_files["meta"]),
    ]
    new_args = [
        "amazon2023",
        "--reviews",
        str(amazon2023_files["csv"]),
        "--meta",
        str(amazon2023_files["meta"]),
    ]
    assert main([*old_args, "--out", str(tmp_path / "old")]) == 0
    assert main([*new_args, "--out", str(tmp_path / "new")]) == 0
    old, new = datasets.load_from_disk(str(tmp_path / "old")), datasets.load_from_disk(str(tmp_path / "new"))
    assert (
        old["train"]["history"] == new["train"]["history"] and old["test"]["target"] == new["test"]["target"]
    )
    assert old["items"]["categories"][0] == ["Books", "Science & Math"]


def test_bad_line_exits_2_naming_file_line_and_field_and_writes_nothing(tmp_path, amazon2023_files, capsys):
    reviews = [review_2023(u, i, r, t) for u, i, r, t in small_log()]
    reviews[4]["timestamp"] = "not a number"
    path = write_jsonl(tmp_path / "bad.jsonl", reviews)
    status, out = _prep(
        tmp_path, "amazon2023", "--reviews", str(path), "--meta", str(amazon2023_files["meta"])
    )
    assert status == 2
    assert f"{path}, line 5, field 'timestamp'" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_skip_counts_bad_lines_in_stats(tmp_path, amazon2023_files):
    reviews = [review_2023(u, i, r, t) for u, i, r, t in small_log()]
    del reviews[4]["user_id"]
    path = write_jsonl(tmp_path / "bad.jsonl", reviews)
    status, out = _prep(
        tmp_path,
        "amazon2023",
        "--reviews",
        str(path),
        "--meta",
        str(amazon2023_files["meta"]),
        "--on-bad-line",
        "skip",
    )
    assert status == 0
    assert json.loads((out / "stats.json").read_text())["read"]["reviews"]["bad_lines_skipped"] == 1


def test_window_that_keeps_nothing_exits_2(tmp_path, amazon2023_files, capsys):
    status, out = _prep(
        tmp_path,
        "amazon2023",
        "--reviews",
        str(amazon2023_files["csv"]),
        "--meta",
        str(amazon2023_files["meta"]),
        "--start",
        "2030-01-01",
    )
    assert status == 2 and "no interaction is left" in capsys.readouterr().err and not out.exists()


def test_rerun_replaces_an_earlier_output(tmp_path, amazon2023_files):
    args = ["amazon2023", "--reviews", str(amazon2023_files["csv"]), "--meta", str(amazon2023_files["meta"])]
    assert _prep(tmp_path, *args)[0] == 0
    status, out = _prep(tmp_path, *args, "--window-size", "1")
    assert status == 0 and max(len(h) for h in datasets.load_from_disk(str(out))["train"]["history"]) == 1


def test_amazon2023_category_downloads_from_base_url(tmp_path, amazon2023_files, file_server):
    file_server.files["/benchmark/5core/rating_only/Video_Games.csv.gz"] = gzip.compress(
        amazon2023_files["csv"].read_bytes()
    )
    file_server.files["/raw/meta_categories/meta_Video_Games.jsonl.gz"] = amazon2023_files[
        "meta"
    ].read_bytes()
    status, out = _prep(
        tmp_path,
        "amazon2023",
        "--category",
        "Video_Games",
        "--base-url",
        file_server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert status == 0 and (tmp_path / "cache" / "Video_Games.csv.gz").exists()
    assert datasets.load_from_disk(str(out))["items"].num_rows == 6


def test_synthetic_files_feed_amazon2023(tmp_path):
    raw = tmp_path / "raw"
    assert (
        main(["synthetic", "--users", "50", "--items", "40", "--interactions", "600", "--out-raw", str(raw)])
        == 0
    )
    status, out = _prep(
        tmp_path,
        "amazon2023",
        "--reviews",
        str(raw / "Synthetic.jsonl.gz"),
        "--meta",
        str(raw / "meta_Synthetic.jsonl.gz"),
    )
    assert status == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"]["reviews"]["rows"] == 600 and stats["summary"]["items"] <= 40


def test_every_source_has_help(capsys):
    for source in ("movielens", "amazon2023", "amazon2018", "synthetic"):
        with pytest.raises(SystemExit):
            main([source, "--help"])
        assert "default" in capsys.readouterr().out
