"""The files that make a training output folder self-contained: what the run ranks with travels with it.

A run folder (`recipes/recpo.py --output_dir`) holds, beside the adapter and the tokenizer:
- `item_index.pt`: the catalog's item vectors at the end of training, and a hash of the adapter they were
  computed with (recipes/trainer.py);
- `score_prior.pt`: the popularity prior, when the run scored with one (rewards/prior.py);
- `catalog.parquet`: the items table of the run's dataset (item_id, title, prompt, ...) in the index's row
  order, so `recipes.recommend --model <run>` needs no `--data`;
- `scoring.json`: how the run scores (answer marker, reasoning or not, tau, the evaluation's reasoning length,
  the prior's weight and half-life): the defaults of `recipes.evaluate` and `recipes.recommend` for this run;
- `data_stats.json`: the dataset's `stats.json` (source, options, counts), which the model card reports;
- `run_config.json`: the script, model and precision options, and the training settings that differ from
  RecPOConfig's defaults (`recipes.config.changed_settings`).
Read and written here without TRL, so the inference commands start fast. A `checkpoint-N/` folder inside a
run shares its run's files (looked up in the parent folder).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ITEM_INDEX_FILE = "item_index.pt"
PRIOR_FILE = "score_prior.pt"
CATALOG_FILE = "catalog.parquet"
SCORING_FILE = "scoring.json"
DATA_STATS_FILE = "data_stats.json"
RUN_CONFIG_FILE = "run_config.json"
STATS_FILE = "stats.json"  # data_prep's name, in the dataset folder

# What `recipes.evaluate` and `recipes.recommend` use for a model that is not a run (or a run older than
# scoring.json): the paper's tau and marker, reasoning on, 128 reasoning tokens.
DEFAULT_SCORING = {"answer_marker": "<answer>", "reasoning": True, "tau": 0.02, "max_new_tokens": 128}


class RunFolderError(ValueError):
    """A run folder's file is unreadable or lacks a field; the message names the file and the field."""


def run_file(folder: Path, name: str) -> Path | None:
    """`name` in the run folder, or in its parent when `folder` is a checkpoint-N folder; None if neither."""
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path: Path) -> str:
    """The file's sha256 (the trainer stores its adapter's in item_index.pt; loading compares it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(document, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


# ------------------------------------------------------------------ scoring settings


def scoring_settings(args, with_prior: bool) -> dict:
    """What a run ranks with, from its RecPOConfig: the settings its evaluations used."""
    return {
        "answer_marker": args.answer_marker,
        "reasoning": bool(args.reasoning),
        "tau": float(args.similarity_temperature),
        "max_new_tokens": int(args.eval_max_completion_length or args.max_completion_length),
        "popularity_prior_weight": float(args.popularity_prior_weight),
        "popularity_prior_half_life_days": args.popularity_prior_half_life_days,
        "prior_file": PRIOR_FILE if with_prior else None,
    }


def check_scoring(document: dict, where: str) -> dict:
    """The settings if each field has the expected type; a RunFolderError naming the field otherwise."""
    expected = {
        "answer_marker": (str, "a non-empty string"),
        "reasoning": (bool, "true or false"),
        "tau": ((int, float), "a positive number"),
        "max_new_tokens": (int, "a positive integer"),
    }
    for name, (kind, what) in expected.items():
        value = document.get(name)
        bad = not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
        if bad or (name != "reasoning" and not value) or (name in ("tau", "max_new_tokens") and value <= 0):
            raise RunFolderError(f"{where}: field {name!r} must be {what}, got {value!r}")
    return document


def read_scoring(folder: Path) -> dict | None:
    """The run's scoring.json (the folder's, or its run's for a checkpoint), checked; None when absent."""
    path = run_file(folder, SCORING_FILE)
    return None if path is None else check_scoring(read_json(path), str(path))


# ------------------------------------------------------------------ catalog


def write_catalog(items, folder: Path) -> Path:
    """The items table (a datasets.Dataset) as parquet, in its row order: row i is item index i."""
    import pyarrow.parquet as pq

    path = folder / CATALOG_FILE
    pq.write_table(items.with_format("arrow")[:], path)  # the rows as selected, without a progress bar
    return path


def read_catalog(path: Path):
    """A run's catalog as a datasets.Dataset (in memory: nothing is written to the datasets cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise RunFolderError(f"{path}: not a readable catalog ({err}); copy it again from the run") from err
    missing = {"item_id", "title", "prompt"} - set(table.column_names)
    if missing:
        raise RunFolderError(f"{path}: the catalog lacks the column(s) {sorted(missing)}")
    return Dataset(table)


def catalog_item_ids(path: Path) -> list[str]:
    """The catalog's item ids, in row order, reading that column alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return [str(i) for i in pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist()]
    except (OSError, KeyError, pa.ArrowInvalid) as err:
        raise RunFolderError(f"{path}: cannot read the column 'item_id' ({err})") from err


# ------------------------------------------------------------------ data stats


def copy_data_stats(data_dir: str | Path, folder: Path) -> Path | None:
    """Copy data_prep's stats.json of the run's dataset into the run folder (None when the dataset has none)."""
    source = Path(data_dir) / STATS_FILE
    if not source.is_file():
        return None
    target = folder / DATA_STATS_FILE
    shutil.copyfile(source, target)
    return target
