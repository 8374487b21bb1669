"""Steps 1-6 end to end: canonical tables in, a DatasetDict and its stats out, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import EmptyResultError
from data_prep.filters import drop_repeated_pairs, keep_known_items, window_and_core
from data_prep.options import PipelineOptions
from data_prep.prompts import item_prompt_column, user_prompt_column
from data_prep.sequences import Samples, build_samples, index_catalog
from data_prep.splits import SPLITS, split_samples
from data_prep.text import clean_items

TABLE_CHUNK = 100_000  # sample rows built and written at a time


def _list_column(offsets: np.ndarray, values: np.ndarray, type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), pa.array(values, type))


def sample_table(samples: Samples, user_ids: pa.Array, titles: pa.Array) -> pa.Table:
    """Sample rows of the output contract."""
    return pa.table(
        {
            "user_id": user_ids.take(pa.array(samples.user)),
            "history": _list_column(samples.offsets, samples.history, pa.int64()),
            "target": pa.array(samples.target, pa.int64()),
            "timestamp": pa.array(samples.timestamp, pa.int64()),
            "history_timestamps": _list_column(samples.offsets, samples.history_timestamps, pa.int64()),
            "history_ratings": _list_column(samples.offsets, samples.history_ratings, pa.float64()),
            "prompt": user_prompt_column(samples, titles),
        }
    )


def item_table(catalog: pa.Table) -> pa.Table:
    """Item rows of the output contract; item_index equals the row number."""
    return pa.table(
        {
            "item_index": pa.array(np.arange(catalog.num_rows), pa.int64()),
            "item_id": catalog.column("item_id"),
            "title": catalog.column("title"),
            "description": catalog.column("description"),
            "categories": catalog.column("categories"),
            "average_rating": catalog.column("average_rating"),
            "rating_number": catalog.column("rating_number"),
            "prompt": item_prompt_column(catalog),
        }
    )


@dataclass
class Prepared:
    """Everything the output needs, before the (chunked) tables are built."""

    samples: Samples
    parts: dict[str, np.ndarray]  # split name -> indices into samples, in target-time order
    user_ids: pa.Array  # user id by user code
    catalog: pa.Table  # cleaned items in item-index order
    stats: dict[str, Any]

    def split_tables(self, name: str, chunk: int = TABLE_CHUNK) -> Iterator[pa.Table]:
        """The sample rows of one split, `chunk` rows at a time (bounded memory for any size)."""
        index, titles = self.parts[name], self.catalog.column("title").combine_chunks()
        for start in range(0, len(index), chunk):
            yield sample_table(self.samples.take(index[start : start + chunk]), self.user_ids, titles)


def prepare(interactions: pa.Table, items: pa.Table, options: PipelineOptions) -> Prepared:
    """Run steps 1-6 on canonical tables, with every step's counters."""
    stats: dict[str, Any] = {}
    items, stats["clean_items"] = clean_items(items, options.max_title_words, options.require_price)
    kept, stats["known_items"] = keep_known_items(interactions, items.column("item_id"))
    if kept.num_rows == 0:
        raise EmptyResultError(
            "known_items",
            f"none of the {interactions.num_rows} interactions has an item with a usable title in the metadata "
            "(do the review and metadata files belong to the same category?)",
        )
    kept, stats["repeated_pairs"] = drop_repeated_pairs(kept)
    kept, window_stats = window_and_core(
        kept, options.start_ms, options.end_ms, options.kcore, options.min_items
    )
    stats.update(window_stats)
    item_index, catalog_ids = index_catalog(kept)
    catalog = items.take(pc.index_in(catalog_ids, value_set=items.column("item_id")))
    samples, user_ids, stats["sequences"] = build_samples(kept, item_index, options.window_size)
    if len(samples) == 0:
        raise EmptyResultError("sequences", f"no user among {len(user_ids)} has two or more interactions")
    parts = split_samples(samples, options.split)
    empty = [name for name in SPLITS if len(parts[name]) == 0]
    if empty:
        raise EmptyResultError(
            "split",
            f"{len(samples)} samples leave the {'/'.join(empty)} split(s) empty with --split {options.split}",
        )
    n_users, n_items, n_inter = len(user_ids), catalog.num_rows, kept.num_rows
    stats["summary"] = {
        "interactions": n_inter,
        "users": n_users,
        "items": n_items,
        "density": n_inter / (n_users * n_items),
        "samples": {name: len(parts[name]) for name in SPLITS},
    }
    return Prepared(samples, parts, user_ids, catalog, stats)


def _write_arrow(path: Path, tables: Iterable[pa.Table]) -> None:
    writer = None
    for table in tables:
        if writer is None:
            writer = pa.ipc.new_stream(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def save(prepared: Prepared, stats: dict[str, Any], out: str | Path) -> Path:
    """Write the DatasetDict and stats.json to a temporary folder beside `out`, then rename it into place.

    Each split is first streamed chunk by chunk into an Arrow file that `datasets` memory-maps and
    copies into its own layout: saving a large in-memory table would cost twice its size in RAM.
    """
    from datasets import Dataset, DatasetDict
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    out = Path(out)
    if out.exists() and not (out / "dataset_dict.json").is_file():
        raise FileExistsError(
            f"{out} exists and is not a dataset written by data_prep; remove it or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    old = None
    disable_progress_bar()
    try:
        for name in SPLITS:
            _write_arrow(staging / f"{name}.arrow", prepared.split_tables(name))
        _write_arrow(staging / "items.arrow", [item_table(prepared.catalog)])
        splits = {name: Dataset.from_file(str(staging / f"{name}.arrow")) for name in (*SPLITS, "items")}
        DatasetDict(splits).save_to_disk(str(tmp))
        del splits
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def run(
    interactions: pa.Table,
    items: pa.Table,
    options: PipelineOptions,
    out: str | Path,
    source: dict[str, Any],
    read_stats: dict[str, Any],
) -> dict[str, Any]:
    """prepare + save; returns the stats that were written."""
    started = time.perf_counter()
    prepared = prepare(interactions, items, options)
    stats = {"source": source, "options": dataclasses.asdict(options), "read": read_stats, **prepared.stats}
    save(prepared, stats, out)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats
