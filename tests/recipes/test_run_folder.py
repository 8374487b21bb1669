"""A run folder works on its own (recipes/run_folder.py): it carries its catalog, scoring settings, prior and the
data's stats; a copy whose dataset is gone recommends with the run's own settings, evaluates with `--data`, and
reuses its item index only for its own weights and catalog."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from recipes import evaluate, recommend
from recipes.loading import ModelLoadError, item_index_for, load_for_inference
from recipes.run_folder import CATALOG_FILE, DEFAULT_SCORING, file_sha256, read_catalog, read_scoring

THREADS = ["--threads", "1", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def moved_run(tiny_run, synthetic_data, tmp_path) -> Path:
    """The run copied to another place, its dataset gone: run_config.json names a data folder that was removed."""
    data = tmp_path / "data-then-removed"
    shutil.copytree(synthetic_data, data)
    run = tmp_path / "elsewhere" / tiny_run.name
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "run_config.json").read_text())
    config["script"]["data_dir"] = config["data_dir"] = str(data)
    (run / "run_config.json").write_text(json.dumps(config))
    shutil.rmtree(data)
    return run


@pytest.fixture
def reasoning_spy(monkeypatch) -> list[int]:
    """The max_new_tokens of every reasoning call recipes.recommend makes."""
    calls: list[int] = []
    original = recommend.reason_and_encode

    def spy(model, tokenizer, prompts, closer, max_new_tokens, *args, **kwargs):
        calls.append(max_new_tokens)
        return original(model, tokenizer, prompts, closer, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(recommend, "reason_and_encode", spy)
    return calls


def history_of(run: Path) -> str:
    return "; ".join(read_catalog(run / CATALOG_FILE)["title"][:3])


# ------------------------------------------------------------------ what the folder holds


def test_a_run_folder_holds_its_catalog_scoring_prior_and_data_stats(tiny_run, synthetic_data):
    data = load_from_disk(str(synthetic_data))
    catalog = read_catalog(tiny_run / CATALOG_FILE)
    assert catalog["item_id"] == data["items"]["item_id"] and catalog["prompt"] == data["items"]["prompt"]
    scoring = read_scoring(tiny_run)
    assert scoring == {
        "answer_marker": "<answer>",
        "reasoning": True,
        "tau": 0.02,
        "max_new_tokens": 6,  # eval_max_completion_length, not the rollouts' 8
        "popularity_prior_weight": 1.0,
        "popularity_prior_half_life_days": None,
        "prior_file": "score_prior.pt",
    }
    assert (tiny_run / "score_prior.pt").is_file()
    assert json.loads((tiny_run / "data_stats.json").read_text()) == json.loads(
        (synthetic_data / "stats.json").read_text()
    )
    index = torch.load(tiny_run / "item_index.pt", weights_only=True)
    assert index["weights_sha256"] == file_sha256(tiny_run / "adapter_model.safetensors")
    training = json.loads((tiny_run / "run_config.json").read_text())["training"]
    assert training["changed"]["popularity_prior_weight"] == {"value": 1.0, "default": 0.0, "paper": True}


# ------------------------------------------------------------------ a copy, its dataset gone


def test_a_moved_run_recommends_without_its_data_with_its_own_settings(
    moved_run, reasoning_spy, monkeypatch, capsys
):
    monkeypatch.setattr(recommend, "load_dataset_dir", lambda path: pytest.fail(f"read a dataset: {path}"))
    rec = recommend.main(["--model", str(moved_run), "--history", history_of(moved_run), *THREADS])
    assert reasoning_spy == [6]  # the run's reasoning length, not the command's old 128
    err = capsys.readouterr().err
    assert (
        f"reused {moved_run / 'item_index.pt'}" in err and "same catalog as the run's catalog.parquet" in err
    )
    assert "popularity prior: the run's own: 1 log q(i)" in err
    assert len(rec.items) == 10


def test_flags_override_the_run_settings(moved_run, reasoning_spy):
    recommend.main(
        ["--model", str(moved_run), "--history", history_of(moved_run), "--max-new-tokens", "3", *THREADS]
    )
    assert reasoning_spy == [3]
    recommend.main(
        ["--model", str(moved_run), "--history", history_of(moved_run), "--no-reasoning", *THREADS]
    )
    assert reasoning_spy == [3]  # no reasoning call


def test_a_plain_model_keeps_the_old_defaults(tiny_model_dir, synthetic_data, reasoning_spy):
    titles = "; ".join(load_from_disk(str(synthetic_data))["items"]["title"][:2])
    recommend.main(
        ["--model", str(tiny_model_dir), "--data", str(synthetic_data), "--history", titles, *THREADS]
    )
    assert reasoning_spy == [DEFAULT_SCORING["max_new_tokens"]] == [128]


def test_a_plain_model_without_data_says_data_is_needed(tiny_model_dir):
    with pytest.raises(SystemExit, match="--data is needed: .* carries no catalog"):
        recommend.main(["--model", str(tiny_model_dir), "--history", "x"])


def test_user_needs_data_even_for_a_run(moved_run):
    with pytest.raises(SystemExit, match="--user needs --data"):
        recommend.main(["--model", str(moved_run), "--user", "u1"])


def test_a_moved_run_evaluates_with_data_and_its_own_settings(
    moved_run, synthetic_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="recipes.evaluate")
    document = evaluate.main(
        ["--model", str(moved_run), "--data", str(synthetic_data), "--max-users", "4", *THREADS]
    )
    scoring = document["scoring"]
    assert (scoring["max_new_tokens"], scoring["tau"], scoring["reasoning"]) == (6, 0.02, True)
    assert scoring["popularity_prior_weight"] == 1.0
    assert any("reused" in r.message and "same catalog" in r.message for r in caplog.records)
    # The same users and settings as the run's own final test evaluation: the same ranks.
    own = json.loads((moved_run / "results.json").read_text())["per_user"]["test"]
    assert document["per_user"]["test"] == own


# ------------------------------------------------------------------ item index reuse


def prompts_and_ids(loaded, synthetic_data):
    items = load_from_disk(str(synthetic_data))["items"]
    return evaluate.item_prompt_ids(loaded.tokenizer, items), list(items["item_id"])


def test_the_index_is_reused_by_its_weights_hash_whatever_the_file_times(moved_run, synthetic_data):
    later = os.path.getmtime(moved_run / "item_index.pt") + 100
    os.utime(moved_run / "adapter_model.safetensors", (later, later))  # a download's arbitrary times
    loaded = load_for_inference(str(moved_run), device="cpu", dtype="float32")
    _, how = item_index_for(loaded, *prompts_and_ids(loaded, synthetic_data), use_cache=False)
    assert how.startswith("reused")

    index = torch.load(moved_run / "item_index.pt", weights_only=True)
    torch.save({**index, "weights_sha256": "0" * 64}, moved_run / "item_index.pt")  # other weights
    _, how = item_index_for(loaded, *prompts_and_ids(loaded, synthetic_data), use_cache=False)
    assert how.startswith("built")


def test_an_index_of_another_catalog_is_not_reused(moved_run, synthetic_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(moved_run / CATALOG_FILE)
    other = table.set_column(
        table.column_names.index("item_id"),
        "item_id",
        pa.array([f"{i}-x" for i in table["item_id"].to_pylist()]),
    )
    pq.write_table(other, moved_run / CATALOG_FILE)
    loaded = load_for_inference(str(moved_run), device="cpu", dtype="float32")
    _, how = item_index_for(loaded, *prompts_and_ids(loaded, synthetic_data), use_cache=False)
    assert how.startswith("built")


# ------------------------------------------------------------------ unreadable files


def test_a_truncated_adapter_is_one_error_naming_the_file(moved_run, synthetic_data):
    weights = moved_run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_for_inference(str(moved_run), device="cpu")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--model", str(moved_run), "--data", str(synthetic_data), *THREADS])
    message = str(stop.value)
    assert "\n" not in message and str(weights) in message and "truncated" in message


def test_a_scoring_file_with_a_wrong_field_is_an_error_naming_it(moved_run):
    scoring = json.loads((moved_run / "scoring.json").read_text())
    (moved_run / "scoring.json").write_text(json.dumps({**scoring, "max_new_tokens": "six"}))
    with pytest.raises(
        ModelLoadError, match=r"scoring.json: field 'max_new_tokens' must be a positive integer"
    ):
        load_for_inference(str(moved_run), device="cpu")


def test_an_embedded_run_loads_the_embedded_model_whatever_its_adapter_names(tmp_path):
    from recipes.loading import _base_model
    from recipes.modeling import EMBEDDED_HUB_ID, EMBEDDED_MODEL

    run = {"model": {"model_name_or_path": EMBEDDED_MODEL}}
    for base in (EMBEDDED_HUB_ID, "/another/machine/.cache/recpo/models/SmolLM2-135M-Instruct"):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        assert _base_model(tmp_path, run) == EMBEDDED_MODEL  # offline, and the weights it was trained on
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": EMBEDDED_HUB_ID}))
    assert _base_model(tmp_path, {"model": {"model_name_or_path": "x/y"}}) == EMBEDDED_HUB_ID
