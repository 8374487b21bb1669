"""Recommend for one history: print the model's reasoning and its top-K catalog items.

    python -m recipes.recommend --model outputs/smollm2-135m-movielens-recpo \\
        --history "Toy Story (1995); Star Wars (1977); Fargo (1996)"
    python -m recipes.recommend --model outputs/smollm2-135m-movielens-recpo --data data/ml-100k-w5 --user 196

A run folder carries its catalog (catalog.parquet) and its scoring settings (scoring.json: reasoning length,
tau, marker, prior), so `--history` needs no `--data` for it; other models need `--data` for the catalog.

`--history` takes catalog titles separated by ';', oldest first. Each is matched to the catalog
case-insensitively (surrounding and repeated whitespace ignored); a title that matches nothing stops the
command with the closest catalog titles (difflib) for each, so a typo or a missing "(1995)" is one copy
away. A title shared by several catalog items resolves to the first of them (the earliest in the
catalog's order) and says so on stderr: the items behind a duplicated title are indistinguishable to the
user who typed it. The prompt is data_prep's user prompt, with the items shown `--gap-days` apart
(the newest that long ago) and each rated `--rating`, since a typed history has neither.

`--user` takes that user's latest sample (by target time) from the test split, else valid, else train,
with its stored prompt and history, and also prints where the held-out next item ranked.
History items are never recommended.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict

from data_prep.prompts import user_messages
from recipes.baselines import load_dataset_dir
from recipes.decoding import reason_and_encode
from recipes.evaluate import (
    add_model_arguments,
    item_prompt_ids,
    load_model_or_exit,
    resolve_scoring,
    scoring_prior,
    setup_logging,
)
from recipes.evaluation import cosine_scores, render_user_prompt
from recipes.loading import item_index_for
from recipes.modeling import cpu_attention_settings
from recipes.onednn import bound_kernel_caches
from recipes.run_folder import CATALOG_FILE, RunFolderError, read_catalog, run_file
from recipes.vectors import MarkerCloser, encode_sequences
from rewards.ranking import target_rank

MS_PER_DAY = 86_400_000
CLOSE_MATCHES = 5
USER_SPLITS = ("test", "valid", "train")


class TitleError(ValueError):
    """Some typed titles match no catalog item; the message lists the closest ones for each."""


@dataclass
class Recommendation:
    reasoning: str
    marker_written: bool
    items: list[int]  # top-K catalog rows, best first
    scores: list[float]
    all_scores: torch.Tensor  # (items,) with the history at -inf


def normalise(title: str) -> str:
    return " ".join(title.split()).casefold()


def split_history(text: str) -> list[str]:
    titles = [t.strip() for t in text.split(";") if t.strip()]
    if not titles:
        raise TitleError(f'--history {text!r}: no titles; separate them with ";"')
    return titles


def match_titles(queries: Sequence[str], titles: Sequence[str]) -> tuple[list[int], list[str]]:
    """Catalog rows of the typed titles, and notes about titles that several items share."""
    rows_by_key: dict[str, list[int]] = {}
    for row, title in enumerate(titles):
        rows_by_key.setdefault(normalise(title), []).append(row)
    matched, notes, unknown = [], [], []
    for query in queries:
        rows = rows_by_key.get(normalise(query))
        if rows is None:
            unknown.append(query)
            continue
        matched.append(rows[0])
        if len(rows) > 1:
            notes.append(
                f"{query!r} is the title of {len(rows)} catalog items (rows {rows}); using row {rows[0]}"
            )
    if unknown:
        by_key = {normalise(t): t for t in reversed(titles)}  # first title wins for each key
        lines = []
        for query in unknown:
            close = difflib.get_close_matches(normalise(query), list(by_key), n=CLOSE_MATCHES, cutoff=0.4)
            hint = "; ".join(repr(by_key[k]) for k in close) if close else "nothing close"
            lines.append(f"  {query!r}: closest catalog titles: {hint}")
        raise TitleError(f"{len(unknown)} title(s) match no catalog item:\n" + "\n".join(lines))
    return matched, notes


def typed_history_messages(titles: Sequence[str], gap_days: float, rating: float) -> list[dict[str, str]]:
    """data_prep's user prompt for a typed history: oldest first, `gap_days` apart, the newest `gap_days` ago."""
    ages = [round((len(titles) - i) * gap_days * MS_PER_DAY) for i in range(len(titles))]
    return user_messages(titles, ages, [rating] * len(titles))


def latest_sample(data: DatasetDict, user_id: str) -> tuple[str, dict]:
    """The user's sample with the latest target time, from the first split (test, valid, train) that has one."""
    for split in USER_SPLITS:
        table = data[split].with_format("arrow")
        column = table["user_id"]
        hits = pc.indices_nonzero(pc.equal(column.cast("string"), str(user_id))).to_pylist()
        if hits:
            times = table["timestamp"].to_pylist()
            best = max(hits, key=lambda i: (times[i], i))
            return split, data[split][best]
    sample = data["test"]["user_id"][:5] if len(data["test"]) else data["train"]["user_id"][:5]
    raise SystemExit(
        f"error: --user {user_id}: no sample of this user in {', '.join(USER_SPLITS)} "
        f"(user ids look like {', '.join(map(str, sample))})"
    )


@torch.no_grad()
def recommend(
    loaded,
    messages: list[dict],
    history: Sequence[int],
    item_index: torch.Tensor,
    closer: MarkerCloser,
    *,
    k: int = 10,
    reasoning: bool = True,
    tau: float = 0.02,
    max_new_tokens: int = 128,
    prior: torch.Tensor | None = None,
) -> Recommendation:
    """Reason (or not), read the user vector at the marker, score the catalog, mask the history, take the top K."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = render_user_prompt(tokenizer, messages, reasoning, closer.marker)
    if reasoning:
        vectors, completions, wrote = reason_and_encode(model, tokenizer, [prompt], closer, max_new_tokens)
        text = tokenizer.decode(completions[0], skip_special_tokens=True)
        written = wrote[0]
    else:
        vectors = encode_sequences(model, [prompt], tokenizer.pad_token_id)
        text, written = "", True
    scores = cosine_scores(vectors, item_index, tau, prior)[0].cpu()  # (items,)
    scores[list(history)] = float("-inf")
    top = scores.topk(min(k, len(scores) - len(set(history))))
    return Recommendation(text, written, top.indices.tolist(), top.values.tolist(), scores)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.recommend",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--history", help='Catalog titles, oldest first, separated by ";" (case-insensitive).')
    who.add_argument("--user", help="A user id of the dataset: recommend from their latest sample's history.")
    parser.add_argument("--k", type=int, default=10, help="How many items to recommend (default: 10).")
    parser.add_argument(
        "--gap-days",
        type=float,
        default=1.0,
        help="--history only: days between the typed items in the prompt, and since the newest (default: 1.0).",
    )
    parser.add_argument(
        "--rating",
        type=float,
        default=5.0,
        help="--history only: the rating shown for every typed item (default: 5.0).",
    )
    add_model_arguments(
        parser,
        data_help="A data_prep output folder (datasets.load_from_disk). Default: the run's own catalog "
        f"({CATALOG_FILE}) when --model is a run folder; needed for --user and for other models.",
        data_required=False,
    )
    return parser


def catalog_and_data(args: argparse.Namespace) -> tuple[Dataset, DatasetDict | None]:
    """The catalog to rank, and the --data dataset (None when the run folder's own catalog is used)."""
    if args.data is not None:
        data = load_dataset_dir(args.data)
        return data["items"], data
    folder = Path(args.model).expanduser()
    catalog = run_file(folder, CATALOG_FILE) if folder.is_dir() else None
    if catalog is None:
        raise SystemExit(
            f"error: --data is needed: --model {args.model} carries no catalog ({CATALOG_FILE}, which a run folder "
            "of recipes/recpo.py holds)"
        )
    if args.user is not None:
        raise SystemExit("error: --user needs --data: the users' histories are in the dataset's splits")
    try:
        return read_catalog(catalog), None
    except RunFolderError as err:
        raise SystemExit(f"error: {err}") from err


def main(argv: Sequence[str] | None = None) -> Recommendation:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.k <= 0 or (args.max_new_tokens is not None and args.max_new_tokens <= 0) or args.gap_days < 0:
        raise SystemExit("error: --k and --max-new-tokens must be positive and --gap-days not negative")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bound_kernel_caches()
    cpu_attention_settings()
    items, data = catalog_and_data(args)
    titles = list(items["title"])
    held_out: tuple[str, int] | None = None
    if args.history is not None:
        try:
            typed = split_history(args.history)
            history, notes = match_titles(typed, titles)
        except TitleError as err:
            raise SystemExit(f"error: {err}") from err
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        messages = typed_history_messages([titles[h] for h in history], args.gap_days, args.rating)
    else:
        split, row = latest_sample(data, args.user)
        history, messages = list(row["history"]), row["prompt"]
        held_out = (split, row["target"])

    start = time.perf_counter()
    loaded = load_model_or_exit(args)
    print(f"scoring: {resolve_scoring(args, loaded)}", file=sys.stderr)
    closer = MarkerCloser(loaded.tokenizer, args.answer_marker)
    index, how = item_index_for(
        loaded,
        item_prompt_ids(loaded.tokenizer, items),
        list(items["item_id"]),
        batch_size=args.item_batch_size,
        rebuild=args.rebuild_index,
        use_cache=args.index_cache,
    )
    print(f"item index: {how}", file=sys.stderr)
    prior, prior_how = scoring_prior(args, loaded, items, data)
    print(f"popularity prior: {prior_how}", file=sys.stderr)
    rec = recommend(
        loaded,
        messages,
        history,
        index,
        closer,
        k=args.k,
        reasoning=args.reasoning,
        tau=args.tau,
        max_new_tokens=args.max_new_tokens,
        prior=prior.bias if prior is not None else None,
    )

    print(f"Model: {loaded.description} ({time.perf_counter() - start:.1f} s)")
    print("History (oldest first):")
    for position, row in enumerate(history, 1):
        print(f"  {position:>2}. {titles[row]}")
    if args.reasoning:
        suffix = "" if rec.marker_written else f"  [{closer.marker} appended: the model did not write it]"
        print(f"Reasoning:\n  {rec.reasoning.strip()}{suffix}")
    else:
        print("Reasoning: none (--no-reasoning)")
    score = "cos / tau" + (f" + {prior.weight:g} log q" if prior is not None else "")
    print(f"Top {len(rec.items)} (score = {score}, history masked):")
    for position, (row, score) in enumerate(zip(rec.items, rec.scores, strict=True), 1):
        print(f"  {position:>2}. {score:9.4f}  {titles[row]}")
    if held_out is not None:
        split, target = held_out
        rank = int(target_rank(rec.all_scores[None], [target])[0])
        print(
            f"Held-out next item ({split}): {titles[target]}, rank {rank} of {len(titles) - len(set(history))}"
        )
    return rec


if __name__ == "__main__":
    main()
