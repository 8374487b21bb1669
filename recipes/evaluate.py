"""Evaluate a model on a split: full-catalog ranking with the history masked, Hit@K / NDCG@K, traces.

    python -m recipes.evaluate --model outputs/smollm2-135m-movielens-recpo --data data/ml-100k-w5 \\
        --split test --out reports/ml-100k/recpo.json
    python -m recipes.evaluate --model embedded/SmolLM2-135M-Instruct --data data/ml-100k-w5 \\
        --split test --max-users 200 --out reports/ml-100k/zero-shot.json

`--model` is a training output folder, a checkpoint-N folder, a model folder or Hub id, or the embedded
default (see `recipes/loading.py`). Each user gets greedy reasoning closed by the answer marker (or, with
`--no-reasoning`, the marker right after the prompt); the hidden state there is scored against every
catalog item with cos / tau, and the target's rank gives the metrics of `rewards.ranking`, the same
definitions as the trainer and `recipes.baselines`. The printed table gives each metric's 95% bootstrap
interval over users. `--out` writes `{"<split>": {"hit@5": ...}, "per_user": {"<split>": {"sample_index":
[...], "rank": [...]}}}`, the shape of the trainer's results file, which `recipes.report` reads: each
scored user's row in the split (the seeded `--max-users` subset pairs up with the trainer's and the
baselines') and the target's rank (contract: `recipes/intervals.py`). The traces file holds one JSON line
per user: user id, history titles, the reasoning, the target title, its rank and the top-10 with scores.
The item index is reused when it belongs to the same weights and catalog, rebuilt otherwise (how it is
decided: `recipes/loading.py`).

For a run folder, the run's own scoring settings (its scoring.json: reasoning or not, the reasoning length of
its evaluations, tau, the answer marker, the popularity prior) are the defaults; flags override them. With
`--out`, the result is also kept in `<run>/evaluations/` and the run's model card is refreshed with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from datasets import Dataset

from recipes.baselines import format_table, load_dataset_dir
from recipes.evaluation import RankingResult, evaluate_users, render_item_prompt, sample_indices
from recipes.intervals import per_user_record
from recipes.loading import LoadedModel, ModelLoadError, item_index_for, load_for_inference, read_prior
from recipes.model_card import refresh_card
from recipes.modeling import EMBEDDED_MODEL, cpu_attention_settings
from recipes.onednn import bound_kernel_caches
from recipes.run_folder import DEFAULT_SCORING, RUN_CONFIG_FILE
from recipes.vectors import MarkerCloser
from rewards.prior import ScorePrior, train_prior

logger = logging.getLogger("recipes.evaluate")

TRACE_TOP = 10


RUN_DEFAULT = "the run's own (its scoring.json) for a run folder, else"


def add_model_arguments(
    parser: argparse.ArgumentParser, data_help: str | None = None, data_required: bool = True
) -> None:
    """Options shared with `recipes.recommend`: which model, where it runs, how it reasons."""
    parser.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help="A training output folder, a checkpoint-N folder inside one, a model folder or Hub id, or the "
        f"embedded default (default: {EMBEDDED_MODEL}).",
    )
    parser.add_argument(
        "--data",
        required=data_required,
        default=None,
        help=data_help or "A data_prep output folder (datasets.load_from_disk).",
    )
    reasoning = parser.add_mutually_exclusive_group()
    reasoning.add_argument(
        "--no-reasoning",
        dest="reasoning",
        action="store_const",
        const=False,
        default=None,
        help="Read the user vector right after the prompt, with the answer marker pre-filled, instead of after "
        f"greedy reasoning (the paper's no-reasoning ablation). Default: {RUN_DEFAULT} reason.",
    )
    reasoning.add_argument(
        "--reasoning",
        dest="reasoning",
        action="store_const",
        const=True,
        help="Reason before reading the user vector, also for a run trained without reasoning.",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="Reasoning tokens before the answer marker is forced in. Default: the reasoning length of the run's "
        f"own evaluations (its scoring.json) for a run folder, else {DEFAULT_SCORING['max_new_tokens']}.",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=None,
        help=f"tau in s(u, i) = cos(h_u, h_i) / tau. Default: {RUN_DEFAULT} {DEFAULT_SCORING['tau']} (the paper's).",
    )
    prior = parser.add_mutually_exclusive_group()
    prior.add_argument(
        "--popularity-prior-weight",
        type=float,
        default=None,
        help="Score with s = cos / tau + W log q(i), q from the --data train split's targets (add-one smoothed); 0 "
        "scores without a prior. Default: the run's own prior when --model is a run trained with one "
        "(score_prior.pt), else none (the paper's score).",
    )
    prior.add_argument(
        "--prior-from",
        default=None,
        help="Score with the popularity prior of this run (its folder or its score_prior.pt), whatever --model is: "
        "e.g. the untrained model scored as a trained run scores.",
    )
    parser.add_argument(
        "--popularity-prior-half-life-days",
        type=float,
        default=None,
        help="With --popularity-prior-weight: count each train target 2^(-age / half-life), its age in days before "
        "the last train target (default: every target counts 1).",
    )
    parser.add_argument(
        "--answer-marker",
        default=None,
        help="Text that closes the reasoning; it must be the marker the model was trained with. Default: "
        f"{RUN_DEFAULT} {DEFAULT_SCORING['answer_marker']}.",
    )
    parser.add_argument(
        "--item-batch-size",
        type=int,
        default=64,
        help="Items encoded at once when building the index (default: 64).",
    )
    parser.add_argument(
        "--rebuild-index",
        action="store_true",
        help="Always recompute the item index, even when a matching one exists (default: reuse a matching one).",
    )
    parser.add_argument(
        "--no-index-cache",
        dest="index_cache",
        action="store_false",
        help="Neither read nor write item indexes under $RECPO_CACHE/item_index (default: use the cache; the "
        "trainer's item_index.pt is still reused when it matches).",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto, a GPU when there is one)."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="The base weights' dtype. Default auto: a run's own precision (its run_config.json), otherwise bfloat16 "
        "on a CPU with bf16 matrix units (AMX-BF16, AVX512-BF16) and float32 elsewhere (recipes/precision.py).",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's own choice)."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--split", default="test", choices=["valid", "test"], help="Which split to rank (default: test)."
    )
    parser.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="Evaluate a fixed random subset of this many samples, drawn with --seed (default: all). The same "
        "seed draws the same subset as the trainer's --max_eval_users/--max_test_users.",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Users reasoned at once (default: 32).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the --max-users subset (default: 42).")
    parser.add_argument(
        "--out",
        default=None,
        help='Write the metrics here as JSON: {"<split>": {"hit@5": ...}, "per_user": {"<split>": '
        '{"sample_index": [...], "rank": [...]}}} (default: none).',
    )
    parser.add_argument(
        "--traces",
        default=None,
        help="JSON-lines file of per-user traces (default: <out stem>_traces_<split>.jsonl beside --out, or "
        "traces_<split>.jsonl in the current folder without --out).",
    )
    return parser


def select_rows(dataset: Dataset, max_users: int | None, seed: int) -> list[dict]:
    """All rows, or a seeded random subset in dataset order (the trainer draws its subsets the same way)."""
    return dataset.select(sample_indices(len(dataset), max_users, seed)).to_list()


def item_prompt_ids(tokenizer, items: Dataset) -> list[list[int]]:
    return [render_item_prompt(tokenizer, messages) for messages in items["prompt"]]


def default_traces_path(out: str | None, split: str) -> Path:
    if out:
        out_path = Path(out)
        return out_path.with_name(f"{out_path.stem}_traces_{split}.jsonl")
    return Path(f"traces_{split}.jsonl")


def trace_records(rows: Sequence[dict], result: RankingResult, titles: Sequence[str]) -> Iterator[dict]:
    """One record per user, the same fields as the trainer's traces plus whether the model wrote the marker."""
    for i, row in enumerate(rows):
        top = [
            {"title": titles[int(item)], "score": round(float(score), 4)}
            for item, score in zip(result.top_items[i], result.top_scores[i], strict=True)
            if score != float("-inf")  # a catalog with fewer than 10 unmasked items
        ]
        yield {
            "user_id": row.get("user_id"),
            "history": [titles[h] for h in row["history"]],
            "reasoning": result.completions[i] if result.completions else "",
            "marker_written": bool(result.marker_found[i]) if result.marker_found else None,
            "target": titles[row["target"]],
            "rank": int(result.ranks[i]),
            "top10": top,
        }


def write_jsonl(path: Path, records: Iterator[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def resolve_scoring(args: argparse.Namespace, loaded: LoadedModel) -> str:
    """Set the scoring options left unset to the run's own settings (scoring.json), or the defaults for other
    models; returns a line saying which."""
    own = loaded.scoring or {}
    taken = []
    for name, default in DEFAULT_SCORING.items():
        if getattr(args, name) is None:
            setattr(args, name, own.get(name, default))
            taken.append(name)
    source = "the run's own settings (scoring.json)" if own else "the defaults"
    settings = (
        f"reasoning up to {args.max_new_tokens} tokens" if args.reasoning else "no reasoning"
    ) + f", tau {args.tau:g}, marker {args.answer_marker}"
    return f"{settings} ({source} for {', '.join(taken)})" if taken else f"{settings} (as given)"


def scoring_prior(
    args: argparse.Namespace, loaded: LoadedModel, items: Dataset, data=None
) -> tuple[ScorePrior | None, str]:
    """The popularity prior to score with, and a line saying which (see the --popularity-prior-weight help).

    `data`: the --data dataset, whose train split --popularity-prior-weight counts (None: the run's catalog)."""
    num_items = len(items)
    if args.popularity_prior_weight is not None:
        if data is None:
            raise SystemExit(
                "error: --popularity-prior-weight counts the targets of a train split: pass --data"
            )
        prior = train_prior(
            data["train"], num_items, args.popularity_prior_weight, args.popularity_prior_half_life_days
        )
        how = "none" if prior is None else f"{prior.weight:g} log q(i), q from {args.data}'s train split"
    elif args.prior_from is not None:
        try:
            prior = read_prior(Path(args.prior_from))
        except ModelLoadError as err:
            raise SystemExit(f"error: --prior-from {args.prior_from}: {err}") from err
        how = f"{prior.weight:g} log q(i) from {args.prior_from}"
    else:
        prior = loaded.prior
        how = "none" if prior is None else f"the run's own: {prior.weight:g} log q(i)"
    if prior is not None and prior.log_q.numel() != num_items:
        catalog = args.data or "the run"
        raise SystemExit(
            f"error: the popularity prior has {prior.log_q.numel()} items, the catalog of {catalog} {num_items}"
        )
    return prior, how


def load_model_or_exit(args: argparse.Namespace) -> LoadedModel:
    try:
        return load_for_inference(args.model, device=args.device, dtype=args.dtype)
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from err


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {value}")


def setup_logging() -> None:
    """Our INFO lines (what was loaded, where the index came from); libraries stay at WARNING."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("recipes").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> dict:
    """Evaluate; returns what `--out` holds: `{"<split>": metrics, "per_user": {"<split>": ...}}`."""
    args = build_parser().parse_args(argv)
    setup_logging()
    check_positive(args, ["max_users", "batch_size", "item_batch_size", "max_new_tokens", "tau"])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bound_kernel_caches()
    cpu_attention_settings()
    data = load_dataset_dir(args.data)
    items = data["items"]
    indices = sample_indices(len(data[args.split]), args.max_users, args.seed)
    rows = data[args.split].select(indices).to_list()  # what select_rows draws, with the row indices kept
    if not rows:
        raise SystemExit(f"error: --data {args.data}: the {args.split} split is empty")

    start = time.perf_counter()
    loaded = load_model_or_exit(args)
    logger.info("Loaded %s", loaded.description)
    logger.info("Scoring: %s", resolve_scoring(args, loaded))
    closer = MarkerCloser(loaded.tokenizer, args.answer_marker)
    item_ids = list(items["item_id"])
    index, how = item_index_for(
        loaded,
        item_prompt_ids(loaded.tokenizer, items),
        item_ids,
        batch_size=args.item_batch_size,
        rebuild=args.rebuild_index,
        use_cache=args.index_cache,
    )
    logger.info("Item index: %s", how)
    prior, prior_how = scoring_prior(args, loaded, items, data)
    logger.info("Popularity prior: %s", prior_how)
    result = evaluate_users(
        loaded.model,
        loaded.tokenizer,
        rows,
        index,
        closer,
        reasoning=args.reasoning,
        tau=args.tau,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        top_k=TRACE_TOP,
        progress=f"eval {args.split}",
        prior=prior.bias if prior is not None else None,
    )
    results = {args.split: result.metrics()}
    per_user = {args.split: per_user_record(indices, result.ranks)}
    elapsed = time.perf_counter() - start
    mode = "reasoning" if args.reasoning else "no reasoning"
    if prior is not None:
        mode += f", prior {prior.weight:g} log q"
    title = f"{loaded.description} on {args.data}, {len(rows)} users, {mode} ({elapsed:.1f} s)"
    print(format_table(results, title, per_user))
    if args.reasoning:
        written = sum(result.marker_found) / len(rows)
        print(f"answer marker written by the model itself: {written:.1%} of users", file=sys.stderr)

    traces = Path(args.traces) if args.traces else default_traces_path(args.out, args.split)
    write_jsonl(traces, trace_records(rows, result, list(items["title"])))
    print(f"traces: {traces}", file=sys.stderr)
    scoring = {
        "reasoning": args.reasoning,
        "max_new_tokens": args.max_new_tokens,
        "tau": args.tau,
        "answer_marker": args.answer_marker,
        "popularity_prior_weight": prior.weight if prior is not None else 0.0,
        "popularity_prior": prior_how,
    }
    document = {**results, "per_user": per_user, "scoring": scoring}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
        print(f"metrics: {args.out}", file=sys.stderr)
        keep_in_run(loaded, Path(args.out).name, document)
    return document


def keep_in_run(loaded: LoadedModel, name: str, document: dict) -> None:
    """A run folder's evaluation goes into its evaluations/ and its model card (not a checkpoint's: the card is
    the run's)."""
    folder = loaded.folder
    if folder is None or not (folder / RUN_CONFIG_FILE).is_file():
        return
    kept = folder / "evaluations" / name
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(document, indent=2) + "\n")
    print(f"kept in the run: {kept}; model card refreshed: {refresh_card(folder)}", file=sys.stderr)


if __name__ == "__main__":
    main()
