"""Amazon-2023-format review and metadata files of any size, for benchmarks and demos.

Popularity of items and activity of users follow power laws (a few blockbusters, a long tail),
timestamps are spread over five years, titles and descriptions come from small word pools and carry
the quirks of the real files: HTML entities, non-ASCII text, some missing titles, some items with
no metadata line at all. Review lines are assembled column-wise with pyarrow, not row by row.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.options import SyntheticOptions

START_MS = 1_514_764_800_000  # 2018-01-01
END_MS = 1_696_118_400_000  # 2023-10-01
RATING_P = [0.05, 0.06, 0.11, 0.23, 0.55]
ADJECTIVES = [
    "Classic",
    "Deluxe",
    "Wireless",
    "Vintage",
    "Ultra",
    "Compact",
    "Électrique",
    "Pro",
    "Smart",
    "Retro",
]
NOUNS = [
    "Guitar",
    "Controller",
    "Headphones",
    "Vinyl Record",
    "Keyboard",
    "Amplifier",
    "Game",
    "Cable",
    "Stand",
]
EXTRAS = ["", "", "", " &amp; Case", " for Kids", " – Limited Edition", " (2-Pack)", " Set &quot;Home&quot;"]
SENTENCES = [
    "Built to last with a sturdy frame.",
    "Loved by beginners and pros alike.",
    "Includes everything you need to start.",
    "<b>New</b> version with improved sound &amp; feel.",
    "Ships in recyclable packaging.",
    "Compatible with most systems — see details.",
]
REVIEW_TITLES = ["Great", "Five Stars", "Not bad", "Très bien", "Disappointed", "Works as described"]
REVIEW_TEXTS = [
    "Exactly what I wanted.",
    "Arrived quickly and works fine.",
    "The sound is warm and clear, highly recommend.",
    "Stopped working after a month.",
    "Good value for the money 👍",
]
MISSING_META = 0.01
MISSING_TITLE = 0.01


def power_law_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / (np.arange(n) + 10.0) ** exponent
    return rng.permutation(weights / weights.sum())


def ids(prefix: str, n: int, width: int) -> list[str]:
    return [f"{prefix}{i:0{width}X}" for i in range(n)]


def _strings(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string())


def _pick(pool: list[str], n: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(pool).take(pa.array(rng.integers(0, len(pool), n)))


def review_columns(options: SyntheticOptions, rng: np.random.Generator) -> dict[str, pa.Array]:
    k = options.interactions
    users = rng.choice(options.users, size=k, p=power_law_weights(options.users, 0.8, rng))
    items = rng.choice(options.items, size=k, p=power_law_weights(options.items, 1.0, rng))
    return {
        "user_id": pa.array(ids("A", options.users, 12)).take(pa.array(users)),
        "parent_asin": pa.array(ids("B0", options.items, 8)).take(pa.array(items)),
        "rating": pc.binary_join_element_wise(
            _strings(rng.choice(np.arange(1, 6), size=k, p=RATING_P)), ".0", ""
        ),
        "timestamp": _strings(rng.integers(START_MS, END_MS, size=k)),
    }


def _write_lines(path: Path, lines: pa.Array) -> None:
    """Write a no-null string array as newline-terminated lines (gzip if the name ends in .gz)."""
    opener = functools.partial(gzip.open, compresslevel=1) if path.name.endswith(".gz") else open
    with opener(path, "wb") as out:
        step = 200_000
        for start in range(0, len(lines), step):
            chunk = pc.binary_join_element_wise(lines.slice(start, step), "\n", "")
            offsets, data = chunk.buffers()[1], chunk.buffers()[2]
            bounds = np.frombuffer(offsets, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
            out.write(memoryview(data)[int(bounds[0]) : int(bounds[-1])])


def review_lines(columns: dict[str, pa.Array], csv: bool, rng: np.random.Generator) -> pa.Array:
    if csv:
        return pc.binary_join_element_wise(
            columns["user_id"], columns["parent_asin"], columns["rating"], columns["timestamp"], ","
        )
    k = len(columns["user_id"])
    return pc.binary_join_element_wise(
        '{"rating": ',
        columns["rating"],
        ', "title": "',
        _pick(REVIEW_TITLES, k, rng),
        '", "text": "',
        _pick(REVIEW_TEXTS, k, rng),
        '", "images": [], "asin": "',
        columns["parent_asin"],
        '", "parent_asin": "',
        columns["parent_asin"],
        '", "user_id": "',
        columns["user_id"],
        '", "timestamp": ',
        columns["timestamp"],
        ', "helpful_vote": ',
        _strings(rng.integers(0, 5, k)),
        ', "verified_purchase": true}',
        "",
    )


def meta_lines(item_ids: list[str], by_item: dict[str, int], rng: np.random.Generator) -> pa.Array:
    """One metadata JSON line per item; the random draws are made for all items at once."""
    n = len(item_ids)
    adjective, noun = rng.integers(0, len(ADJECTIVES), n), rng.integers(0, len(NOUNS), n)
    extra, number = rng.integers(0, len(EXTRAS), n), rng.integers(1, 999, n)
    no_title = rng.random(n) < MISSING_TITLE
    price = np.where(rng.random(n) < 0.3, "None", np.char.mod("%.2f", rng.uniform(3, 300, n)))
    stars = np.round(rng.uniform(1, 5, n), 1)
    extra_votes = rng.integers(0, 50, n)
    n_sentences = rng.integers(0, 4, n)
    sentence_order = np.argsort(rng.random((n, len(SENTENCES))), axis=1)
    lines = []
    for i, item_id in enumerate(item_ids):
        title = f"{ADJECTIVES[adjective[i]]} {NOUNS[noun[i]]} {number[i]}{EXTRAS[extra[i]]}"
        record = {
            "main_category": "Synthetic",
            "title": None if no_title[i] else title,
            "average_rating": float(stars[i]),
            "rating_number": int(by_item.get(item_id, 0) + extra_votes[i]),
            "features": [SENTENCES[sentence_order[i, -1]]],
            "description": [SENTENCES[j] for j in sentence_order[i, : n_sentences[i]]],
            "price": str(price[i]),
            "images": [],
            "videos": [],
            "store": "Synthetic Store",
            "categories": ["Synthetic", NOUNS[noun[i]]],
            "details": {"Brand": "Acme"},
            "parent_asin": item_id,
            "bought_together": None,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return pa.array(lines, pa.string())


def write_synthetic(options: SyntheticOptions) -> dict[str, Path]:
    """Write `<Cat>.<reviews_format>` and `meta_<Cat>.jsonl.gz` into options.out_raw."""
    for name in ("users", "items", "interactions"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    rng = np.random.default_rng(options.seed)
    out = Path(options.out_raw)
    out.mkdir(parents=True, exist_ok=True)
    columns = review_columns(options, rng)
    csv = options.reviews_format.startswith("csv")
    lines = review_lines(columns, csv, rng)
    if csv:
        lines = pa.concat_arrays([pa.array(["user_id,parent_asin,rating,timestamp"]), lines])
    reviews = out / f"{options.category}.{options.reviews_format}"
    _write_lines(reviews, lines)
    counts = pc.value_counts(columns["parent_asin"]).to_pylist()
    by_item = {c["values"]: c["counts"] for c in counts}
    item_ids = ids("B0", options.items, 8)
    listed = rng.random(len(item_ids)) >= MISSING_META
    meta = out / f"meta_{options.category}.jsonl.gz"
    _write_lines(
        meta, meta_lines([i for i, keep in zip(item_ids, listed, strict=True) if keep], by_item, rng)
    )
    return {"reviews": reviews, "meta": meta}
