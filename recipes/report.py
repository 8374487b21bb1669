"""Compare runs and baselines: a Markdown table and PNG plots, from the runs' own files (no wandb).

    python -m recipes.report --run popularity=reports/ml-100k/popularity.json \\
        --run sasrec=reports/ml-100k/sasrec.json --run recpo=outputs/recpo --out reports/ml-100k

Each PATH is a results JSON (`{"valid": {"hit@5": ...}, "test": {...}}`, as written by the trainer,
`recipes.baselines` and `recipes.evaluate`) or a training output folder holding `results.json` and the
HF Trainer's `trainer_state.json` (its `log_history` feeds the training curves). Writes
`OUT/report.md`, `OUT/training_curves.png` (where a run has training logs) and `OUT/final_metrics.png`.

A results file that carries per-user ranks (the `"per_user"` key, contract in `recipes/intervals.py`)
gets 95% bootstrap intervals and a mean-rank column in the tables, and the main run is compared with
every other run on the users both scored (matched by `sample_index`) with paired intervals; a training
folder whose `results_before.json` has per-user ranks adds the main run's paired before -> after change.
Files without per-user ranks are reported as before, with values only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from recipes.intervals import (  # noqa: E402
    LEVEL,
    MEAN_RANK,
    RESAMPLES,
    Interval,
    PerUser,
    align_by_sample_index,
    bootstrap_intervals,
    check_per_user,
    format_interval,
    format_value,
    paired_differences,
)

SPLITS = ("valid", "test")
# (log key, panel title): what the RecPO trainer logs, in the order the panels are drawn.
CURVES = (
    ("reward", "Reward (fused)"),
    ("rewards/ndcg/mean", "NDCG reward"),
    ("rewards/softmax/mean", "Softmax reward"),
    ("completions/mean_length", "Completion length (tokens)"),
    ("valid/hit@5", "Valid Hit@5"),
    ("valid/ndcg@10", "Valid NDCG@10"),
)

Results = dict[str, dict[str, float]]  # split -> metric -> value
PerUserSplits = dict[str, PerUser]  # split -> {"sample_index": [...], "rank": [...]}
Intervals = dict[str, dict[str, dict[str, Interval]]]  # run -> split -> metric -> interval
# The paired comparison's columns: the metric that moves first, then the headline ones.
PAIRED_METRICS = (MEAN_RANK, "hit@20", "ndcg@10", "ndcg@20")
BEFORE_FILE = "results_before.json"


class ReportError(ValueError):
    """A run's files are missing or malformed; the message names the file."""


@dataclass
class Run:
    name: str
    source: Path
    results: Results
    log_history: list[dict[str, Any]] | None = field(default=None)
    per_user: PerUserSplits = field(default_factory=dict)
    # The untrained model's per-user ranks, from a training folder's results_before.json.
    per_user_before: PerUserSplits = field(default_factory=dict)


# ---------------------------------------------------------------- loading


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from err


def parse_results(data: Any, path: Path) -> Results:
    """Check the `{"valid": {metric: number}, "test": {...}}` shape; other top-level keys are ignored."""
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise ReportError(f"{path}: expected a JSON object with a 'valid' and/or 'test' key of metrics")
    results: Results = {}
    for split in SPLITS:
        if split not in data:
            continue
        metrics = data[split]
        if not isinstance(metrics, dict):
            raise ReportError(
                f"{path}: '{split}' must map metric names to numbers, got {type(metrics).__name__}"
            )
        for name, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ReportError(f"{path}: '{split}.{name}' must be a number, got {value!r}")
        results[split] = {name: float(v) for name, v in metrics.items()}
    return results


def parse_per_user(data: Any, path: Path) -> PerUserSplits:
    """The file's "per_user" ranks of the splits it scored; {} when it has none (files written before them)."""
    per_user = data.get("per_user") if isinstance(data, dict) else None
    if per_user is None:
        return {}
    if not isinstance(per_user, dict):
        raise ReportError(f"{path}: 'per_user' must map split names to per-user ranks")
    try:
        return {s: check_per_user(per_user[s], f"{path}: per_user.{s}") for s in SPLITS if s in per_user}
    except ValueError as err:
        raise ReportError(str(err)) from err


def parse_log_history(data: Any, path: Path) -> list[dict[str, Any]]:
    history = data.get("log_history") if isinstance(data, dict) else None
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise ReportError(f"{path}: expected a 'log_history' list of objects (an HF Trainer state file)")
    return history


def find_trainer_state(folder: Path) -> Path | None:
    """The folder's trainer_state.json, else the one in its latest checkpoint-N folder."""
    if (folder / "trainer_state.json").is_file():
        return folder / "trainer_state.json"
    checkpoints = [p for p in folder.glob("checkpoint-*/trainer_state.json") if p.parent.name[11:].isdigit()]
    return max(checkpoints, key=lambda p: int(p.parent.name[11:]), default=None)


def load_run(name: str, path: Path) -> Run:
    if path.is_file():
        data = read_json(path)
        return Run(name, path, parse_results(data, path), per_user=parse_per_user(data, path))
    if not path.is_dir():
        raise ReportError(
            f"run '{name}': {path} does not exist (expected a results JSON or a training folder)"
        )
    results_path = path / "results.json"
    if not results_path.is_file():
        raise ReportError(f"run '{name}': {path} has no results.json (expected a training output folder)")
    data = read_json(results_path)
    run = Run(name, path, parse_results(data, results_path), per_user=parse_per_user(data, results_path))
    before_path = path / BEFORE_FILE
    if before_path.is_file():
        run.per_user_before = parse_per_user(read_json(before_path), before_path)
    state = find_trainer_state(path)
    if state is not None:
        run.log_history = parse_log_history(read_json(state), state)
    return run


def parse_run_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ReportError(f"--run {spec!r}: expected NAME=PATH")
    return name.strip(), Path(path.strip())


# ---------------------------------------------------------------- tables


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Every metric any run reports, hits before NDCGs, each by increasing K."""
    names = {m for run in runs for metrics in run.results.values() for m in metrics}

    def key(name: str) -> tuple[str, float, str]:
        match = re.fullmatch(r"(.*)@(\d+)", name)
        return (match.group(1), int(match.group(2)), name) if match else (name, math.inf, name)

    return sorted(names, key=key)


def best_baseline(runs: Sequence[Run], main: str, split: str, metric: str) -> tuple[str, float] | None:
    scored = [
        (r.name, r.results[split][metric])
        for r in runs
        if r.name != main and metric in r.results.get(split, {})
    ]
    return max(scored, key=lambda item: item[1], default=None)


def relative_improvement(value: float, baseline: float) -> float | None:
    """(value - baseline) / baseline, None when the baseline is zero (no meaningful ratio)."""
    return None if baseline == 0 else (value - baseline) / baseline


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def run_intervals(runs: Sequence[Run]) -> Intervals:
    """95% bootstrap intervals of every run and split that has per-user ranks."""
    return {r.name: {s: bootstrap_intervals(rec["rank"]) for s, rec in r.per_user.items()} for r in runs}


def _cell(value: float | None, metric: str, bold: bool, interval: Interval | None) -> str:
    if value is None:
        return "–"
    text = format_value(value, metric)
    text = f"**{text}**" if bold else text
    if interval is None:
        return text
    return f"{text} [{format_value(interval.low, metric)}, {format_value(interval.high, metric)}]"


def results_table(
    runs: Sequence[Run], split: str, metrics: Sequence[str], intervals: Intervals | None = None
) -> list[str]:
    """One row per run: each metric's value (best in bold) and, with per-user ranks, its 95% interval.

    With per-user ranks the value shown is their mean, the centre of the interval beside it (the file's own
    figure is the same number when the file is well formed). The mean rank column (lowest is best)
    appears when some run has per-user ranks for the split.
    """
    intervals = intervals or {}
    with_rank = any(split in intervals.get(r.name, {}) for r in runs)
    columns = [*metrics, MEAN_RANK] if with_rank else list(metrics)

    def value(run: Run, metric: str) -> float | None:
        interval = intervals.get(run.name, {}).get(split, {}).get(metric)
        return run.results.get(split, {}).get(metric) if interval is None else interval.value

    best = {}
    for m in columns:
        scored = [v for v in (value(r, m) for r in runs) if v is not None]
        best[m] = (min if m == MEAN_RANK else max)(scored, default=None)
    header = ["mean rank" if m == MEAN_RANK else m for m in columns]
    lines = ["| run | " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    for run in runs:
        cells = []
        for m in columns:
            v = value(run, m)
            interval = intervals.get(run.name, {}).get(split, {}).get(m)
            cells.append(_cell(v, m, v is not None and v == best[m], interval))
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return lines


def improvement_table(runs: Sequence[Run], main: Run, metrics: Sequence[str]) -> list[str]:
    lines = [
        f"| split | metric | best baseline | baseline | {main.name} | relative improvement |",
        "|---|---|---|---:|---:|---:|",
    ]
    for split in SPLITS:
        for m in metrics:
            value, best = main.results.get(split, {}).get(m), best_baseline(runs, main.name, split, m)
            if value is None or best is None:
                continue
            gain = relative_improvement(value, best[1])
            gain_text = "n/a (baseline is 0)" if gain is None else f"{gain:+.2%}"
            lines.append(f"| {split} | {m} | {best[0]} | {_fmt(best[1])} | {_fmt(value)} | {gain_text} |")
    return lines


def _difference_cell(interval: Interval, metric: str) -> str:
    text = format_interval(interval, metric, signed=True)
    return f"**{text}**" if interval.excludes_zero() else text


def paired_row(split: str, label: str, a: PerUser, b: PerUser) -> str | None:
    """A table row of b - a on the users both scored; None when they share none."""
    aligned = align_by_sample_index(a, b)
    if aligned.common == 0:
        return None
    changes = paired_differences(aligned.ranks_a, aligned.ranks_b)
    cells = [_difference_cell(changes[m], m) for m in PAIRED_METRICS]
    return f"| {split} | {label} | {aligned.common} | " + " | ".join(cells) + " |"


def paired_comparisons(runs: Sequence[Run], main: Run) -> tuple[list[str], list[str]]:
    """Table rows of main - other per split (and main after - before), and notes on what was skipped."""
    rows, notes = [], []
    for split in SPLITS:
        if split not in main.per_user:
            continue
        pairs = []  # (label, the other side's ranks, who it is in a note when no user is shared)
        if split in main.per_user_before:
            pairs.append((f"{main.name} after - before", main.per_user_before[split], "before training"))
        for other in runs:
            if other.name == main.name:
                continue
            if split in other.per_user:
                pairs.append((f"{main.name} - {other.name}", other.per_user[split], other.name))
            else:
                notes.append(f"{other.name} on {split}: no per-user ranks, not compared")
        for label, a, who in pairs:
            row = paired_row(split, label, a, main.per_user[split])
            if row is None:
                notes.append(f"{who} on {split}: no user in common with {main.name}")
            else:
                rows.append(row)
    return rows, notes


def paired_section(runs: Sequence[Run], main: Run) -> list[str]:
    """Paired differences main - other per split (and main after - before), with the users they share."""
    if not main.per_user:
        return [
            f"`{main.name}` has no per-user ranks (its results file predates them), so there is no paired "
            "comparison; evaluate it again to get them.",
            "",
        ]
    rows, notes = paired_comparisons(runs, main)
    out = [
        "Each difference is computed on the users both sides scored (matched by `sample_index`), with a "
        f"{LEVEL:.0%} paired bootstrap interval over those users ({RESAMPLES} resamples); bold: the interval "
        "excludes 0. "
        "Positive Hit/NDCG and negative mean rank differences favour the first side.",
        "",
    ]
    if rows:
        header = " | ".join("mean rank" if m == MEAN_RANK else m for m in PAIRED_METRICS)
        out += [
            f"| split | comparison | users | {header} |",
            "|---|---|---:|" + "---:|" * len(PAIRED_METRICS),
        ]
        out += [*rows, ""]
    else:
        out += ["Nothing to compare: no other scoring of the same users.", ""]
    if notes:
        out += [*(f"- {note}" for note in notes), ""]
    return out


def has_curves(runs: Sequence[Run]) -> bool:
    """Whether any run logged a key the training curves draw (result files alone log none)."""
    return any(curve(run.log_history or [], key)[0] for run in runs for key, _ in CURVES)


def render_markdown(runs: Sequence[Run], main: str) -> str:
    metrics = metric_names(runs)
    intervals = run_intervals(runs)
    out = ["# Recommendation results", "", "Runs:", ""]
    out += [f"- **{r.name}**: `{r.source}`" for r in runs]
    out += ["", "Full-catalog ranking, history items masked; best value per column in bold."]
    if any(intervals.values()):
        out += [
            f"Runs with per-user ranks show `value [low, high]`: the {LEVEL:.0%} percentile bootstrap interval "
            f"over users ({RESAMPLES} resamples); mean rank is the target's average 1-based rank (lower is better)."
        ]
    out += [""]
    for split in SPLITS:
        if any(split in r.results for r in runs):
            out += [f"## {split}", "", *results_table(runs, split, metrics, intervals), ""]
    main_run = next((r for r in runs if r.name == main), None)
    out += [f"## {main} against the best baseline", ""]
    if main_run is None:
        out += [f"No run is named '{main}'; pass `--main NAME` to compare one run against the others.", ""]
    elif len(runs) < 2:
        out += ["No baseline to compare against.", ""]
    else:
        out += ["Relative improvement = (main - best baseline) / best baseline, per split and metric.", ""]
        out += [*improvement_table(runs, main_run, metrics), ""]
    if main_run is not None:
        out += ["## Paired comparison on the same users", "", *paired_section(runs, main_run)]
    if has_curves(runs):
        out += ["![training curves](training_curves.png)", ""]
    else:
        out += ["No run here has training logs (result files only), so there are no training curves.", ""]
    out += ["![final metrics](final_metrics.png)", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- plots


def curve(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a logged key; HF's `eval_` prefix is accepted too, and the trainer's evaluations
    before and after training (`before/<key>`, `final/<key>`), so a run that evaluates only then has a curve."""
    steps, values = [], []
    for entry in history:
        value = next(
            (entry[k] for k in (key, f"eval_{key}", f"before/{key}", f"final/{key}") if k in entry), None
        )
        if isinstance(value, int | float) and not isinstance(value, bool) and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(value))
    return steps, values


def plot_training_curves(runs: Sequence[Run], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        drawn = False
        for run in runs:
            steps, values = curve(run.log_history or [], key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=run.name)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_final_metrics(runs: Sequence[Run], path: Path) -> None:
    metrics = metric_names(runs)
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(13, 4.5), squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for ax, split in zip(axes.flat, SPLITS, strict=True):
        for i, run in enumerate(runs):
            values = [run.results.get(split, {}).get(m, math.nan) for m in metrics]
            ax.bar(
                [j + (i - (len(runs) - 1) / 2) * width for j in range(len(metrics))],
                values,
                width,
                label=run.name,
            )
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title(split)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def build_report(runs: Sequence[Run], out: Path, main: str = "recpo") -> Path:
    """Write report.md, training_curves.png (where any run has training logs) and final_metrics.png under `out`;
    returns report.md."""
    if len({r.name for r in runs}) != len(runs):
        raise ReportError(f"run names must be unique, got {[r.name for r in runs]}")
    out.mkdir(parents=True, exist_ok=True)
    if has_curves(runs):
        plot_training_curves(runs, out / "training_curves.png")
    else:  # a figure of empty panels says nothing; one left from an earlier report would belong to other runs
        (out / "training_curves.png").unlink(missing_ok=True)
    plot_final_metrics(runs, out / "final_metrics.png")
    report = out / "report.md"
    report.write_text(render_markdown(runs, main))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipes.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="A run to compare: a results JSON or a training output folder (repeat for each run).",
    )
    parser.add_argument("--out", required=True, type=Path, help="Folder for report.md and the PNG plots.")
    parser.add_argument(
        "--main",
        default=None,
        help="The run compared against the best of the others (default: the run named recpo, if any).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        runs = [load_run(*parse_run_spec(spec)) for spec in args.run]
        if args.main is not None and args.main not in {r.name for r in runs}:
            raise ReportError(f"--main {args.main}: no run of that name among {[r.name for r in runs]}")
        report = build_report(runs, args.out, args.main or "recpo")
    except ReportError as err:
        raise SystemExit(f"error: {err}") from err
    figures = [args.out / name for name in ("training_curves.png", "final_metrics.png")]
    print("wrote " + ", ".join(str(path) for path in [report, *figures] if path.is_file()))
    return report


if __name__ == "__main__":
    main()
