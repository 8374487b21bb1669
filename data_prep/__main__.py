"""Command line: `python -m data_prep SOURCE ... --out DIR` (see `--help` of each source)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep.download import DownloadError
from data_prep.errors import DataError, EmptyResultError
from data_prep.options import (
    Amazon2018Options,
    Amazon2023Options,
    PipelineOptions,
    SyntheticOptions,
    add_arguments,
    from_args,
)

DESCRIPTION = (
    "Turn interaction logs into the prompt/target datasets RecPO trains on (DESIGN.md section 1): "
    "a DatasetDict with splits train/valid/test/items plus stats.json at --out."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=DESCRIPTION)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    specs = {
        "movielens": ("MovieLens-100K from the recbole wheel (the embedded default)", None),
        "amazon2023": (
            "Amazon Reviews 2023: download --category, or read local --reviews and --meta files",
            Amazon2023Options,
        ),
        "amazon2018": ("Amazon Reviews 2014/2018 files (--reviews and --meta)", Amazon2018Options),
    }
    for name, (help_text, source_options) in specs.items():
        sub = sources.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--out", required=True, help="output folder (written atomically; an older output is replaced)"
        )
        if source_options is not None:
            add_arguments(sub.add_argument_group(f"{name} input"), source_options)
        add_arguments(sub.add_argument_group("pipeline"), PipelineOptions)
    synthetic = sources.add_parser(
        "synthetic",
        help="write Amazon-2023-format review and metadata files of any size (benchmarks, demos)",
        description="Write <Cat>.jsonl.gz (or .csv) reviews and meta_<Cat>.jsonl.gz with skewed popularity.",
    )
    add_arguments(synthetic, SyntheticOptions)
    return parser


def _run_movielens(args: argparse.Namespace, options: PipelineOptions) -> dict:
    from data_prep.pipeline import run
    from data_prep.sources import movielens_dir, read_movielens

    folder = movielens_dir()
    interactions, items, read_stats = read_movielens(folder, options.on_bad_line)
    return run(
        interactions, items, options, args.out, {"name": "movielens-100k", "folder": str(folder)}, read_stats
    )


def _run_amazon2023(args: argparse.Namespace, options: PipelineOptions) -> dict:
    from data_prep.download import amazon2023_files
    from data_prep.pipeline import run
    from data_prep.sources import read_amazon2023_meta, read_amazon2023_reviews

    src: Amazon2023Options = from_args(Amazon2023Options, args)
    reviews, meta = amazon2023_files(src)
    interactions, review_stats = read_amazon2023_reviews(reviews, options.on_bad_line)
    items, meta_stats = read_amazon2023_meta(meta, options.on_bad_line, options.require_price)
    source = {"name": "amazon2023", "category": src.category, "reviews": str(reviews), "meta": str(meta)}
    return run(interactions, items, options, args.out, source, {"reviews": review_stats, "meta": meta_stats})


def _run_amazon2018(args: argparse.Namespace, options: PipelineOptions) -> dict:
    from data_prep.pipeline import run
    from data_prep.sources import read_amazon2018_meta, read_amazon2018_reviews

    src: Amazon2018Options = from_args(Amazon2018Options, args)
    interactions, review_stats = read_amazon2018_reviews(src.reviews, options.on_bad_line)
    items, meta_stats = read_amazon2018_meta(src.meta, options.on_bad_line, options.require_price)
    source = {"name": "amazon2018", "reviews": src.reviews, "meta": src.meta}
    return run(interactions, items, options, args.out, source, {"reviews": review_stats, "meta": meta_stats})


RUNNERS = {"movielens": _run_movielens, "amazon2023": _run_amazon2023, "amazon2018": _run_amazon2018}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.source == "synthetic":
            from data_prep.synthetic import write_synthetic

            paths = write_synthetic(from_args(SyntheticOptions, args))
            print(f"wrote {paths['reviews']} and {paths['meta']}")
            return 0
        try:
            options = from_args(PipelineOptions, args)
        except ValueError as err:
            parser.error(str(err))
        stats = RUNNERS[args.source](args, options)
    except (DataError, EmptyResultError, FileExistsError) as err:
        print(f"data_prep: error: {err}", file=sys.stderr)
        return 2
    except DownloadError as err:
        print(f"data_prep: download failed: {err}", file=sys.stderr)
        return 1
    summary = stats["summary"]
    print(
        f"wrote {Path(args.out)}: {summary['users']} users, {summary['items']} items, "
        f"{summary['interactions']} interactions, samples {summary['samples']} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
