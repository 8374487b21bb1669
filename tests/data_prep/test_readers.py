import json

import pytest

from data_prep.errors import DataError
from data_prep.sources import read_amazon2018_reviews, read_amazon2023_meta, read_amazon2023_reviews
from tests.data_prep.conftest import T0, review_2023, small_log, write_jsonl, write_lines


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "csv"])
def test_amazon2023_reviews_read_the_same_from_every_format(amazon2023_files, kind):
    table, report = read_amazon2023_reviews(amazon2023_files[kind], "error")
    assert table.column_names == ["user_id", "item_id", "rating", "timestamp"]
    assert table.num_rows == len(small_log())
    assert table.to_pylist()[0] == {
        "user_id": "u1",
        "item_id": "IA",
        "rating": 1.0,
        "timestamp": T0 + 86_400_000,
    }
    assert report["slow_path"] is False


def test_amazon2023_meta_keeps_lists_and_falls_back_to_main_category(amazon2023_files):
    items, _ = read_amazon2023_meta(amazon2023_files["meta"], "error", with_price=False)
    rows = {r["item_id"]: r for r in items.to_pylist()}
    assert rows["IA"]["categories"] == ["Video Games", "PC"]
    assert rows["IE"]["categories"] == ["Video Games"]
    assert rows["ID"]["description"] == []
    assert rows["IG"]["title"] is None
    assert rows["IF"]["average_rating"] is None and rows["IA"]["rating_number"] == 12


def test_amazon2018_reviews_convert_seconds_to_milliseconds(amazon2018_files):
    table, _ = read_amazon2018_reviews(amazon2018_files["reviews"], "error")
    assert table.column("timestamp")[0].as_py() == T0 + 86_400_000


def _reviews_with(tmp_path, bad_line: str, position: int = 2):
    lines = [json.dumps(review_2023("u1", "IA", 5.0, T0 + k)) for k in range(4)]
    lines.insert(position, bad_line)
    return write_lines(tmp_path / "r.jsonl", lines)


@pytest.mark.parametrize(
    ("bad_line", "field", "words"),
    [
        ('{"rating": 5.0, "parent_asin": "IA", "user_id": "u1", "timestamp": 16', None, "broken JSON"),
        ('{"rating": 5.0, "parent_asin": "IA", "timestamp": 1664582400000}', "user_id", "missing"),
        ('{"rating": "five", "parent_asin": "IA", "user_id": "u1", "timestamp": 1}', "rating", "number"),
        (
            '{"rating": 5.0, "parent_asin": "IA", "user_id": "u1", "timestamp": "yesterday"}',
            "timestamp",
            "integer",
        ),
        ('{"rating": 5.0, "parent_asin": ["IA"], "user_id": "u1", "timestamp": 1}', "parent_asin", "string"),
    ],
)
def test_bad_json_line_error_names_file_line_and_field(tmp_path, bad_line, field, words):
    path = _reviews_with(tmp_path, bad_line)
    with pytest.raises(DataError) as caught:
        read_amazon2023_reviews(path, "error")
    err = caught.value
    assert (err.file, err.line, err.field) == (str(path), 3, field)
    assert words in err.problem and "line 3" in str(err)


def test_bad_lines_are_skipped_and_counted_with_skip(tmp_path):
    path = _reviews_with(tmp_path, '{"rating": 5.0, "parent_asin": "IA", "user_id": "u1", "timestamp": "x"}')
    table, report = read_amazon2023_reviews(path, "skip")
    assert table.num_rows == 4
    assert report["bad_lines_skipped"] == 1 and "line 3" in report["bad_line_examples"][0]


def test_bad_csv_line_error_names_line_and_field(tmp_path):
    path = write_lines(
        tmp_path / "r.csv", ["user_id,parent_asin,rating,timestamp", "u1,IA,5.0,1", "u1,IB,4.0,soon"]
    )
    with pytest.raises(DataError) as caught:
        read_amazon2023_reviews(path, "error")
    assert (caught.value.line, caught.value.field) == (3, "timestamp")


def test_csv_line_with_wrong_field_count_is_skipped_with_skip(tmp_path):
    path = write_lines(
        tmp_path / "r.csv",
        ["user_id,parent_asin,rating,timestamp", "u1,IA,5.0,1", "u1,IB,4.0", "u2,IB,4.0,3"],
    )
    table, report = read_amazon2023_reviews(path, "skip")
    assert table.column("user_id").to_pylist() == ["u1", "u2"] and report["bad_lines_skipped"] == 1


def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl.gz", [review_2023("u1", "IA", 5.0, T0 + k) for k in range(2000)])
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError) as caught:
        read_amazon2023_reviews(path, "error")
    assert caught.value.file == str(path)


def test_integral_float_timestamp_is_accepted(tmp_path):
    path = write_lines(
        tmp_path / "r.jsonl", ['{"rating": 4, "parent_asin": "IA", "user_id": "u1", "timestamp": 1.0e12}']
    )
    table, report = read_amazon2023_reviews(path, "error")
    assert table.column("timestamp").to_pylist() == [10**12] and report["slow_path"]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_amazon2023_reviews(tmp_path / "nope.jsonl.gz", "error")
