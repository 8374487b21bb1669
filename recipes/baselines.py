"""Classic baselines on a data_prep dataset, scored exactly like the RecPO model.

    python -m recipes.baselines popularity --data data/ml-100k --out reports/ml-100k/popularity.json
    python -m recipes.baselines sasrec --data data/ml-100k --out reports/ml-100k/sasrec.json

Both rank the full catalog for every valid/test sample with the sample's history masked out (the target
never is), and compute Hit@K/NDCG@K with `rewards.ranking`, the same definitions the trainer uses.
`--out` writes `{"valid": {"hit@5": ...}, "test": {...}, "per_user": {...}}`, the shape of the trainer's
results file: "per_user" holds each scored user's row index in the split and target rank (the contract
is in `recipes/intervals.py`), so `recipes.report` can pair the baseline with a model on the same users.
The printed table shows every metric with its 95% bootstrap interval over users.

- popularity: every item is scored by how often it is a *train sample's target*. Each interaction
  after a user's first is exactly one sample's target, so this counts every train-period interaction
  once; counting history items as well would count each interaction up to `window_size` more times.
- recent-popularity: the same count over the last W days of the train split only (W before its latest
  target), ties broken by the all-time count; W is chosen on the whole valid split (best NDCG@10 among
  `--windows`), then the requested splits are scored with it. Popularity drifts (new releases), so the recent
  count is the stronger simple baseline on a temporal split.
- sasrec: see `recipes/sasrec.py`; trained on the train split, early-stopped on valid NDCG@10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_from_disk

from recipes.evaluation import sample_indices
from recipes.intervals import (
    KS,
    LEVEL,
    MEAN_RANK,
    PerUser,
    bootstrap_intervals,
    format_interval,
    per_user_record,
)
from recipes.sasrec import SASRec, SASRecConfig, TrainConfig, fit, score_histories
from rewards.ranking import history_mask, ranking_metrics, target_rank

SPLITS = ("train", "valid", "test", "items")
ScoreFn = Callable[[list[list[int]]], torch.Tensor]  # histories -> (users, items) scores
Results = dict[str, dict[str, float]]  # split -> metric -> value


@dataclass
class BaselineArgs:
    data: str = field(metadata={"help": "A data_prep output folder (datasets.load_from_disk)."})
    split: str = field(default="both", metadata={"help": "Which split(s) to score: valid, test or both."})
    out: str | None = field(default=None, metadata={"help": "Write the metrics here as JSON."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, shuffling and dropout."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Users scored against the catalog at once."})
    max_users: int | None = field(
        default=None,
        metadata={
            "help": "Score a seeded random subset of this many samples per split (default: all); with the same "
            "--seed it is the subset the trainer and `recipes.evaluate` score. SASRec still early-stops on all "
            "of valid."
        },
    )
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads (0: torch's default). 1 by default: the model is too small to gain from "
            "intra-op parallelism, and 2 threads ran 7x slower on a busy 2-core machine."
        },
    )


@dataclass
class RecentArgs:
    windows: str = field(
        default="1,2,3,5,7,10,14,21,30,45,60,90",
        metadata={
            "help": "Comma-separated window lengths in days to choose from on valid (default: "
            "1,2,3,5,7,10,14,21,30,45,60,90)."
        },
    )


@dataclass
class Split:
    """The ranking task of one split: predict `targets[u]` given `histories[u]`."""

    histories: list[list[int]]
    targets: list[int]
    # Row of each sample in its dataset split; None: all rows in order (0, 1, ...).
    sample_index: list[int] | None = None

    def indices(self) -> list[int]:
        return list(range(len(self.targets))) if self.sample_index is None else self.sample_index


def load_dataset_dir(path: str | Path) -> DatasetDict:
    """Load a data_prep output folder, with a clear error when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"error: --data {path}: no such folder (make prepare-data writes data/ml-100k)")
    try:
        dsd = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --data {path}: not a saved DatasetDict ({err})") from err
    if not isinstance(dsd, DatasetDict):
        raise SystemExit(
            f"error: --data {path}: a single Dataset, expected a DatasetDict with {list(SPLITS)}"
        )
    missing = [s for s in SPLITS if s not in dsd]
    if missing:
        raise SystemExit(f"error: --data {path}: expected splits {list(SPLITS)}, missing {missing}")
    return dsd


def get_split(dsd: DatasetDict, name: str) -> Split:
    ds = dsd[name].with_format("arrow")  # Arrow to_pylist is ~10x faster than iterating rows
    split = Split(histories=ds["history"].to_pylist(), targets=ds["target"].to_pylist())
    num_items = len(dsd["items"])
    bad = next((i for i, t in enumerate(split.targets) if not 0 <= t < num_items), None)
    if bad is not None:
        raise SystemExit(
            f"error: {name} row {bad}: target {split.targets[bad]} is outside the catalog [0, {num_items})"
        )
    return split


def split_ranks(score_fn: ScoreFn, split: Split, num_items: int, batch_size: int = 1024) -> torch.Tensor:
    """(users,) full-catalog rank of each target under `score_fn`, history masked, in batches of users."""
    ranks = []
    for start in range(0, len(split.targets), batch_size):
        histories = split.histories[start : start + batch_size]
        scores = score_fn(histories)  # (batch, items)
        exclude = history_mask(histories, num_items, device=scores.device)  # (batch, items)
        ranks.append(target_rank(scores, split.targets[start : start + batch_size], exclude=exclude))
    return torch.cat(ranks)


def evaluate(score_fn: ScoreFn, split: Split, num_items: int, batch_size: int = 1024) -> dict[str, float]:
    """Full-catalog Hit@K/NDCG@K of `score_fn` on a split, history masked, in batches of users."""
    return ranking_metrics(split_ranks(score_fn, split, num_items, batch_size))


def score_splits(
    score_fn: ScoreFn, dsd: DatasetDict, splits: Sequence[str], args: BaselineArgs
) -> tuple[Results, dict[str, PerUser]]:
    """Metrics and per-user ranks (with each user's row in the split) of `score_fn` on each split."""
    num_items = len(dsd["items"])
    results, per_user = {}, {}
    for name in splits:
        split = scored_split(dsd, name, args)
        ranks = split_ranks(score_fn, split, num_items, args.eval_batch_size)
        results[name] = ranking_metrics(ranks, ks=KS)
        per_user[name] = per_user_record(split.indices(), ranks)
    return results, per_user


def popularity_scores(train: Split, num_items: int) -> torch.Tensor:
    """(items,) float: how many train samples have each item as their target."""
    return torch.bincount(torch.tensor(train.targets, dtype=torch.long), minlength=num_items).float()


def run_popularity(
    dsd: DatasetDict, splits: Sequence[str], args: BaselineArgs
) -> tuple[Results, dict[str, PerUser]]:
    num_items = len(dsd["items"])
    counts = popularity_scores(get_split(dsd, "train"), num_items)  # (items,)

    def score_fn(histories: list[list[int]]) -> torch.Tensor:
        return counts.expand(len(histories), -1)  # the same vector for every user

    return score_splits(score_fn, dsd, splits, args)


MS_PER_DAY = 86_400_000


def recent_popularity_scores(
    targets: Sequence[int], timestamps: Sequence[int], num_items: int, window_days: float
) -> torch.Tensor:
    """(items,) how many train targets fall in the last `window_days` before the latest one, plus the all-time
    count scaled below 1, which only breaks the ties between items with equal recent counts."""
    times = torch.tensor(timestamps, dtype=torch.float64)
    items = torch.tensor(targets, dtype=torch.long)
    recent = items[times >= times.max() - window_days * MS_PER_DAY]
    counts = torch.bincount(items, minlength=num_items).double()
    scores = torch.bincount(recent, minlength=num_items).double() + counts / (counts.max() + 1.0)
    return scores.float()


def parse_windows(text: str) -> list[float]:
    try:
        windows = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as err:
        raise SystemExit(f"error: --windows {text!r}: expected comma-separated numbers of days") from err
    if not windows or any(w <= 0 for w in windows):
        raise SystemExit(f"error: --windows {text!r}: expected positive numbers of days")
    return windows


def run_recent_popularity(
    dsd: DatasetDict, splits: Sequence[str], args: BaselineArgs, windows: Sequence[float]
) -> tuple[Results, dict[str, PerUser], dict]:
    """Choose the window on all of valid by NDCG@10, then score `splits`; also returns the choice's record."""
    num_items = len(dsd["items"])
    train = dsd["train"].with_format("arrow")
    targets, times = train["target"].to_pylist(), train["timestamp"].to_pylist()
    valid = get_split(dsd, "valid")

    def score_fn_of(window: float) -> ScoreFn:
        scores = recent_popularity_scores(targets, times, num_items, window)
        return lambda histories: scores.expand(len(histories), -1)

    on_valid = {
        w: evaluate(score_fn_of(w), valid, num_items, args.eval_batch_size)["ndcg@10"] for w in windows
    }
    best = max(windows, key=lambda w: (on_valid[w], -w))  # ties: the shorter window
    for window in windows:
        mark = "  <- chosen" if window == best else ""
        print(
            f"recent popularity, last {window:g} days: valid ndcg@10 {on_valid[window]:.4f}{mark}",
            file=sys.stderr,
        )
    results, per_user = score_splits(score_fn_of(best), dsd, splits, args)
    choice = {"window_days": best, "valid_ndcg@10_by_window": {f"{w:g}": on_valid[w] for w in windows}}
    return results, per_user, choice


def scored_split(dsd: DatasetDict, name: str, args: BaselineArgs) -> Split:
    """The split as scored for the report: all of it, or the seeded subset of --max-users."""
    split = get_split(dsd, name)
    keep = sample_indices(len(split.targets), args.max_users, args.seed)
    return Split(
        histories=[split.histories[i] for i in keep],
        targets=[split.targets[i] for i in keep],
        sample_index=keep,
    )


def run_sasrec(
    dsd: DatasetDict,
    splits: Sequence[str],
    args: BaselineArgs,
    model_cfg: SASRecConfig,
    train_cfg: TrainConfig,
) -> tuple[Results, dict[str, PerUser]]:
    """Train SASRec on train, early-stop on valid NDCG@10, score the requested splits with the best state."""
    torch.manual_seed(args.seed)
    num_items = len(dsd["items"])
    model = SASRec(num_items, model_cfg)
    train, valid = get_split(dsd, "train"), get_split(dsd, "valid")

    def score_fn(histories: list[list[int]]) -> torch.Tensor:
        return score_histories(model, histories)

    def validate(_: SASRec) -> float:
        return evaluate(score_fn, valid, num_items, args.eval_batch_size)["ndcg@10"]

    best, epoch = fit(model, train.histories, train.targets, train_cfg, validate, seed=args.seed)
    print(f"sasrec: best valid ndcg@10 {best:.4f} at epoch {epoch}", file=sys.stderr)
    return score_splits(score_fn, dsd, splits, args)


def format_table(results: Results, title: str, per_user: dict[str, PerUser] | None = None) -> str:
    """A fixed-width table, one row per split, one column per metric.

    With per-user ranks: one row per metric (mean rank included), one column per split, each cell the
    value and its 95% bootstrap interval over users.
    """
    if per_user:
        return interval_table(results, title, per_user)
    metrics = list(next(iter(results.values())))
    lines = [title, f"{'split':<8}" + "".join(f"{m:>10}" for m in metrics)]
    lines += [f"{s:<8}" + "".join(f"{v[m]:>10.4f}" for m in metrics) for s, v in results.items()]
    return "\n".join(lines)


def interval_table(results: Results, title: str, per_user: dict[str, PerUser]) -> str:
    """Rows of metrics, columns of splits (those with per-user ranks), cells `value [low, high]`."""
    splits = [s for s in results if s in per_user]
    intervals = {s: bootstrap_intervals(per_user[s]["rank"]) for s in splits}
    metrics = [*next(iter(results.values())), MEAN_RANK]
    headers = [f"{s} ({len(per_user[s]['rank'])} users)" for s in splits]
    lines = [
        f"{title}; {LEVEL:.0%} bootstrap intervals over users",
        f"{'metric':<11}" + "".join(f"{h:<26}" for h in headers).rstrip(),
    ]
    for metric in metrics:
        label = "mean rank" if metric == MEAN_RANK else metric
        cells = [format_interval(intervals[s][metric], metric) for s in splits]
        lines.append(f"{label:<11}" + "".join(f"{c:<26}" for c in cells).rstrip())
    return "\n".join(lines)


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One --flag per dataclass field, typed and documented from the field."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        required = f.default is dataclasses.MISSING
        default = None if required else f.default
        parser.add_argument(
            flag, dest=f.name, type=kind, default=default, required=required, help=f.metadata["help"]
        )


def _from_namespace(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.baselines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="method", required=True)
    pop = sub.add_parser("popularity", help="Score items by their train popularity.")
    recent = sub.add_parser(
        "recent-popularity",
        help="Score items by their popularity in the last W days of train, W chosen on valid.",
    )
    sas = sub.add_parser("sasrec", help="Train and score SASRec (Kang & McAuley, 2018).")
    for p in (pop, recent, sas):
        _add_fields(p, BaselineArgs)
    _add_fields(recent, RecentArgs)
    _add_fields(sas.add_argument_group("model"), SASRecConfig)
    _add_fields(sas.add_argument_group("training"), TrainConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Score the baseline; returns what `--out` holds: the metrics per split and "per_user"."""
    ns = build_parser().parse_args(argv)
    args = _from_namespace(BaselineArgs, ns)
    splits = {"both": ("valid", "test"), "valid": ("valid",), "test": ("test",)}.get(args.split)
    if splits is None:
        raise SystemExit(f"error: --split must be valid, test or both, got {args.split!r}")
    dsd = load_dataset_dir(args.data)
    start, threads = time.perf_counter(), torch.get_num_threads()
    try:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        extra = {}
        if ns.method == "popularity":
            results, per_user = run_popularity(dsd, splits, args)
        elif ns.method == "recent-popularity":
            windows = parse_windows(ns.windows)
            results, per_user, extra["recent_popularity"] = run_recent_popularity(dsd, splits, args, windows)
        else:
            model_cfg, train_cfg = _from_namespace(SASRecConfig, ns), _from_namespace(TrainConfig, ns)
            results, per_user = run_sasrec(dsd, splits, args, model_cfg, train_cfg)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests, notebooks)
    title = f"{ns.method} on {args.data} ({time.perf_counter() - start:.1f} s)"
    print(format_table(results, title, per_user))
    document = {**results, "per_user": per_user, **extra}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    return document


if __name__ == "__main__":
    main()
