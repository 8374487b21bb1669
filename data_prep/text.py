"""Step 1: clean item text (unescape HTML, strip tags, collapse whitespace) and decide which items to keep.

Everything works on whole arrow columns; only the rows that contain an HTML entity go through Python's
`html.unescape`.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TAG = r"<[^<>]*>"
SPACE = r"[\s\p{Z}]+"
# Residue of scraped pages (broken tags, inline scripts, template braces) that is not a product title.
JUNK = r"[<>{}]|function\s*\(|\bvar\s+\w+\s*=|https?://|\.getTime\b"
PRICE = r"^\s*\$?\s*[0-9][0-9,]*(\.[0-9]+)?\s*$"


def _unescape(values: pa.Array) -> pa.Array:
    """html.unescape the rows that contain '&'; the others are passed through untouched."""
    has_entity = pc.fill_null(pc.match_substring(values, "&"), False)
    rows = np.flatnonzero(has_entity.to_numpy(zero_copy_only=False))
    if rows.size == 0:
        return values
    fixed = pa.array([html.unescape(s) for s in pc.take(values, rows).to_pylist()], type=pa.string())
    # Scatter without a Python pass over the untouched rows: append the fixed rows, then take.
    index = np.arange(len(values))
    index[rows] = len(values) + np.arange(rows.size)
    return pc.take(pa.concat_arrays([values, fixed]), pa.array(index))


def clean_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Unescape HTML entities, strip tags, collapse all whitespace to single spaces, trim."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = _unescape(values.cast(pa.string()))
    values = pc.replace_substring_regex(values, TAG, " ")
    values = pc.replace_substring_regex(values, SPACE, " ")
    return pc.utf8_trim_whitespace(values)


def clean_text_lists(lists: pa.Array | pa.ChunkedArray) -> pa.Array:
    """clean_text on every string of a list<string> column; empty strings are dropped."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    flat = clean_text(pc.list_flatten(lists))
    parents = pc.list_parent_indices(lists)
    keep = pc.fill_null(pc.not_equal(flat, ""), False)
    flat, parents = pc.filter(flat, keep), pc.filter(parents, keep).to_numpy()
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(np.bincount(parents, minlength=len(lists)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def join_text_lists(lists: pa.Array | pa.ChunkedArray, sep: str = " ") -> pa.Array:
    """Join a list<string> column into one string per row (null lists give '')."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    return pc.fill_null(pc.binary_join(pc.fill_null(lists, pa.scalar([], lists.type)), sep), "")


def title_drop_reasons(titles: pa.Array, max_title_words: int) -> dict[str, np.ndarray]:
    """Boolean masks, one per reason, for cleaned titles; an item counts under its first reason only."""
    missing = pc.fill_null(pc.equal(titles, ""), True).to_numpy(zero_copy_only=False)
    length = pc.fill_null(pc.utf8_length(titles), 0).to_numpy(zero_copy_only=False)
    junk = pc.fill_null(pc.match_substring_regex(titles, JUNK), False).to_numpy(zero_copy_only=False)
    words = pc.fill_null(pc.count_substring_regex(titles, r"\S+"), 0).to_numpy(zero_copy_only=False)
    reasons = {
        "missing_title": missing,
        "one_character_title": length == 1,
        "markup_title": junk,
        "too_long_title": words > max_title_words,
    }
    seen = np.zeros(len(titles), dtype=bool)
    for name, mask in reasons.items():
        reasons[name] = mask & ~seen
        seen |= mask
    return reasons


def price_is_number(prices: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(prices, PRICE), False).to_numpy(zero_copy_only=False)


def clean_items(
    items: pa.Table, max_title_words: int, require_price: bool
) -> tuple[pa.Table, dict[str, Any]]:
    """Clean titles, descriptions and categories; drop items with unusable titles (and no price, if asked).

    `items` has item_id, title, description (list<string>), categories (list<string>) and, when
    `require_price`, price. Duplicate item ids keep their first row.
    """
    counters: dict[str, Any] = {"items_in": items.num_rows}
    ids = items.column("item_id").combine_chunks()
    first = np.zeros(len(ids), dtype=bool)
    first[pc.index_in(pc.unique(ids), value_set=ids).to_numpy()] = True
    counters["duplicate_item_ids"] = int((~first).sum())
    titles = clean_text(items.column("title"))
    reasons = title_drop_reasons(titles, max_title_words)
    if require_price:
        reasons["price_not_a_number"] = ~price_is_number(items.column("price").combine_chunks())
    keep = first.copy()
    for name, mask in reasons.items():
        mask = mask & keep
        counters[name] = int(mask.sum())
        keep &= ~mask
    kept = pa.array(keep)
    out = pa.table(
        {
            "item_id": pc.filter(ids, kept),
            "title": pc.filter(titles, kept),
            "description": join_text_lists(clean_text_lists(pc.filter(items.column("description"), kept))),
            "categories": clean_text_lists(pc.filter(items.column("categories"), kept)),
            "average_rating": pc.filter(items.column("average_rating"), kept),
            "rating_number": pc.filter(items.column("rating_number"), kept),
        }
    )
    counters["items_out"] = out.num_rows
    return out, counters
