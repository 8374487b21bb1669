"""Options of every stage as dataclasses; the command line is generated from their fields and help strings."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

AMAZON2023_BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PipelineOptions:
    """Steps 1-6 of DESIGN.md section 1, shared by every source."""

    start: str | None = _opt(
        None, "keep interactions at or after this UTC date (YYYY-MM-DD); the paper uses 2022-10-01"
    )
    end: str | None = _opt(
        None, "keep interactions before this UTC date (YYYY-MM-DD); the paper uses 2023-10-01"
    )
    window_size: int = _opt(20, "history length: the up to N items before each target (paper: 20)")
    kcore: int = _opt(0, "iterative k-core: keep users and items with at least K interactions (0 = off)")
    max_title_words: int = _opt(20, "drop items whose cleaned title has more words than this (reference: 20)")
    require_price: bool = _opt(
        False, "drop items whose price is not a number (the reference pipeline does this; off by default)"
    )
    min_items: int = _opt(
        0,
        "widen the window backwards by 3 months at a time until at least this many items remain "
        "(reference behaviour; 0 = off; needs --start)",
    )
    split: str = _opt(
        "temporal",
        "temporal: sort samples by target time, first 80%% train, next 10%% valid, last 10%% test "
        "(the paper's protocol); leave-last-out: each user's last sample is test, the one before valid "
        "(users with fewer than 3 samples go to train)",
        choices=("temporal", "leave-last-out"),
    )
    on_bad_line: str = _opt(
        "error",
        "error: stop at a malformed line (exit status 2, naming file, line and field); "
        "skip: skip it and count it in stats.json",
        choices=("error", "skip"),
    )

    def __post_init__(self) -> None:
        for name in ("window_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("kcore", "min_items", "max_title_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if self.min_items and self.start is None:
            raise ValueError("--min-items widens the window backwards from --start, so it needs --start")
        start, end = self.start_ms, self.end_ms
        if start is not None and end is not None and start >= end:
            raise ValueError(f"--start {self.start} must be before --end {self.end}")

    @property
    def start_ms(self) -> int | None:
        return date_to_ms(self.start, "--start")

    @property
    def end_ms(self) -> int | None:
        return date_to_ms(self.end, "--end")


@dataclass
class Amazon2023Options:
    category: str | None = _opt(
        None,
        "category to download, e.g. Video_Games (the paper: Musical_Instruments, CDs_and_Vinyl, Video_Games)",
    )
    reviews: str | None = _opt(
        None, "local review file instead of downloading (.jsonl, .jsonl.gz, .csv, .csv.gz)"
    )
    meta: str | None = _opt(None, "local metadata file instead of downloading (meta_<Category>.jsonl[.gz])")
    reviews_kind: str = _opt(
        "5core",
        "which review file to download: 5core = benchmark/5core/rating_only/<Cat>.csv.gz (the paper's "
        "choice), reviews = raw/review_categories/<Cat>.jsonl.gz",
        choices=("5core", "reviews"),
    )
    base_url: str = _opt(AMAZON2023_BASE_URL, "root of the Amazon Reviews 2023 files")
    cache_dir: str = _opt("data/raw/amazon2023", "where downloads are kept (and resumed)")
    retries: int = _opt(5, "download attempts per file before giving up")


@dataclass
class Amazon2018Options:
    reviews: str = _opt(
        None,
        "review file: JSON lines (.json/.jsonl, optionally .gz) with reviewerID, asin, overall, unixReviewTime",
        required=True,
    )
    meta: str = _opt(
        None,
        "metadata file: JSON lines (optionally .gz) with asin, title, description, category/categories",
        required=True,
    )


@dataclass
class SyntheticOptions:
    users: int = _opt(10_000, "number of users")
    items: int = _opt(5_000, "number of items")
    interactions: int = _opt(100_000, "number of interactions (before any de-duplication)")
    out_raw: str = _opt(None, "folder for the review and metadata files", required=True)
    category: str = _opt(
        "Synthetic", "category name used in the file names (<Cat>.jsonl.gz, meta_<Cat>.jsonl.gz)"
    )
    reviews_format: str = _opt(
        "jsonl.gz",
        "review file format: full review lines or the benchmark rating-only csv",
        choices=("jsonl", "jsonl.gz", "csv", "csv.gz"),
    )
    seed: int = _opt(0, "random seed")


def date_to_ms(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError as err:
        raise ValueError(f"{name} {text!r} is not a date of the form YYYY-MM-DD") from err
    return int(day.timestamp() * 1000)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per dataclass field, with its help string and default."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f"{help_text}")
            continue
        kind = {"int": int, "str": str, "str | None": str}.get(str(f.type), str)
        if not meta.get("required"):
            help_text += f" (default: {f.default})"
        parser.add_argument(flag, type=kind, default=f.default, help=help_text, **meta)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
