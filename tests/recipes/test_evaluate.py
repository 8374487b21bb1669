"""`python -m recipes.evaluate` on a tiny random Llama with the real SmolLM2 tokenizer and a tiny dataset:
well-formed traces and metrics, the seeded user subset, model loading errors, item index reuse."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from recipes import evaluate
from recipes.loading import ITEM_INDEX_FILE, item_index_for, load_for_inference
from recipes.modeling import EMBEDDED_MODEL
from tests.recipes.conftest import TINY_CONFIG, build_tiny_model

FAST = ["--max-new-tokens", "6", "--threads", "1", "--item-batch-size", "64", "--dtype", "float32"]
METRICS = {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}


# ------------------------------------------------------------------ shared builders (also used by test_recommend)


def save_model_dir(folder: Path, tokenizer, seed: int = 0) -> Path:
    build_tiny_model(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_dataset(root: Path) -> Path:
    from data_prep.__main__ import main as data_prep

    raw, out = root / "raw", root / "data"
    args = ["synthetic", "--users", "30", "--items", "40", "--interactions", "400", "--out-raw", str(raw)]
    assert data_prep(args) == 0
    reviews, meta = raw / "Synthetic.jsonl.gz", raw / "meta_Synthetic.jsonl.gz"
    args = [
        "amazon2023",
        "--reviews",
        str(reviews),
        "--meta",
        str(meta),
        "--out",
        str(out),
        "--window-size",
        "5",
    ]
    assert data_prep(args) == 0
    return out


@pytest.fixture(scope="session")
def model_cache(session_recpo_cache: Path) -> Path:
    """The session's cache (`session_recpo_cache`); one torch thread (the box is shared)."""
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return session_recpo_cache


@pytest.fixture(scope="session")
def smol_tokenizer(model_cache):
    from recipes.modeling import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def index_cache(tmp_path, monkeypatch) -> Path:
    """Item indexes of this test's random models go to its own folder, not the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECPO_CACHE", str(cache))
    return cache


def catalog(data_dir: Path):
    from datasets import load_from_disk

    return load_from_disk(str(data_dir))["items"]


def split_size(data_dir: Path, split: str) -> int:
    from datasets import load_from_disk

    return len(load_from_disk(str(data_dir))[split])


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ the command


def test_evaluate_writes_metrics_json_and_well_formed_traces(model_dir, data_dir, tmp_path, index_cache):
    out = tmp_path / "reports" / "tiny.json"
    results = evaluate.main(
        ["--model", str(model_dir), "--data", str(data_dir), "--split", "test", "--max-users", "8"]
        + ["--out", str(out), *FAST]
    )
    written = json.loads(out.read_text())
    assert (
        written == results
        and set(written) == {"test", "per_user", "scoring"}
        and set(written["test"]) == METRICS
    )
    assert all(0.0 <= v <= 1.0 for v in written["test"].values())

    items = catalog(data_dir)
    titles, num_items = list(items["title"]), len(items)
    traces = read_lines(tmp_path / "reports" / "tiny_traces_test.jsonl")  # default: beside --out
    assert len(traces) == 8
    for trace in traces:
        assert set(trace) >= {"user_id", "history", "reasoning", "target", "rank", "top10"}
        assert isinstance(trace["reasoning"], str) and trace["reasoning"].endswith("<answer>")
        assert 1 <= trace["rank"] <= num_items
        assert trace["target"] in titles and all(h in titles for h in trace["history"])
        assert len(trace["top10"]) == 10
        recommended = [entry["title"] for entry in trace["top10"]]
        assert not set(recommended) & set(trace["history"])
        scores = [entry["score"] for entry in trace["top10"]]
        assert scores == sorted(scores, reverse=True)
        if trace["rank"] <= 10:  # the target sits at its rank in the top 10
            assert recommended[trace["rank"] - 1] == trace["target"]


def test_evaluate_out_file_holds_the_seeded_subset_rows_and_their_ranks(
    model_dir, data_dir, tmp_path, index_cache, capsys
):
    from recipes.evaluation import sample_indices

    out = tmp_path / "tiny.json"
    evaluate.main(
        ["--model", str(model_dir), "--data", str(data_dir), "--split", "valid", "--max-users", "5"]
        + ["--seed", "7", "--no-reasoning", "--out", str(out), *FAST]
    )
    per_user = json.loads(out.read_text())["per_user"]
    assert list(per_user) == ["valid"]
    assert per_user["valid"]["sample_index"] == sample_indices(split_size(data_dir, "valid"), 5, 7)
    traces = read_lines(tmp_path / "tiny_traces_valid.jsonl")
    assert per_user["valid"]["rank"] == [t["rank"] for t in traces]  # the same users, in the same order
    printed = capsys.readouterr().out
    assert "95% bootstrap intervals over users" in printed and "valid (5 users)" in printed


def test_evaluate_without_reasoning_writes_traces_in_the_working_folder(
    model_dir, data_dir, tmp_path, index_cache, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    results = evaluate.main(
        ["--model", str(model_dir), "--data", str(data_dir), "--split", "valid", "--no-reasoning", *FAST]
    )
    traces = read_lines(tmp_path / "traces_valid.jsonl")
    assert set(results) == {"valid", "per_user", "scoring"} and len(traces) == split_size(data_dir, "valid")
    assert all(t["reasoning"] == "" for t in traces)


def test_max_users_draws_the_same_subset_for_the_same_seed(data_dir):
    from datasets import load_from_disk

    valid = load_from_disk(str(data_dir))["valid"]
    first, again = evaluate.select_rows(valid, 5, 42), evaluate.select_rows(valid, 5, 42)
    other = evaluate.select_rows(valid, 5, 7)
    assert [r["timestamp"] for r in first] == [r["timestamp"] for r in again]
    assert [r["timestamp"] for r in first] != [r["timestamp"] for r in other]
    assert [r["timestamp"] for r in first] == sorted(r["timestamp"] for r in first)  # dataset order
    assert len(evaluate.select_rows(valid, 10_000, 42)) == len(valid)


def test_missing_model_folder_is_an_error_naming_the_path(data_dir, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit, match=str(missing)):
        evaluate.main(["--model", str(missing), "--data", str(data_dir), *FAST])


def test_output_folder_without_weights_names_its_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    with pytest.raises(SystemExit, match=r"checkpoint-4, checkpoint-12.*run/checkpoint-12"):
        evaluate.main(["--model", str(run), "--data", str(data_dir), *FAST])


# ------------------------------------------------------------------ item index reuse


def make_training_output(folder: Path, base_dir: Path, tokenizer, data_dir: Path) -> Path:
    """What the trainer leaves: a LoRA adapter (non-zero, so it changes the vectors), tokenizer, run_config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run_config = {"script": {"data_dir": str(data_dir)}, "model": {"model_name_or_path": str(base_dir)}}
    (folder / "run_config.json").write_text(json.dumps(run_config))
    return folder


def write_trainer_index(folder: Path, vectors: torch.Tensor) -> None:
    torch.save({"vectors": vectors, "num_items": vectors.shape[0], "step": 2}, folder / ITEM_INDEX_FILE)


def prompts_and_ids(loaded, data_dir: Path):
    items = catalog(data_dir)
    return evaluate.item_prompt_ids(loaded.tokenizer, items), list(items["item_id"])


def test_trainer_index_is_reused_when_it_matches_the_adapter_and_rebuilt_when_not(
    model_dir, data_dir, smol_tokenizer, tmp_path, index_cache
):
    run = make_training_output(tmp_path / "run", model_dir, smol_tokenizer, data_dir)
    num_items = len(catalog(data_dir))
    sentinel = torch.randn(num_items, TINY_CONFIG["hidden_size"])
    write_trainer_index(run, sentinel)
    loaded = load_for_inference(str(run), device="cpu")
    assert "adapter" in loaded.description and loaded.trainer_index == run / ITEM_INDEX_FILE
    prompts, ids = prompts_and_ids(loaded, data_dir)

    vectors, how = item_index_for(loaded, prompts, ids)
    assert torch.equal(vectors, sentinel) and how.startswith("reused") and ITEM_INDEX_FILE in how

    vectors, how = item_index_for(loaded, prompts, ids, rebuild=True)  # --rebuild-index
    assert not torch.equal(vectors, sentinel) and how.startswith("built")

    write_trainer_index(run, sentinel[:-1])  # another catalog size
    vectors, how = item_index_for(loaded, prompts, ids, use_cache=False)
    assert vectors.shape[0] == num_items and how.startswith("built")

    write_trainer_index(run, sentinel)  # an adapter saved after the index: other weights
    later = time.time() + 10
    os.utime(loaded.weights_file, (later, later))
    vectors, how = item_index_for(loaded, prompts, ids, use_cache=False)
    assert not torch.equal(vectors, sentinel) and how.startswith("built")


def test_trainer_index_of_another_catalog_is_not_reused(
    model_dir, data_dir, smol_tokenizer, tmp_path, index_cache
):
    from datasets import load_from_disk

    run = make_training_output(tmp_path / "run", model_dir, smol_tokenizer, data_dir)
    other = load_from_disk(str(data_dir))
    other["items"] = other["items"].map(lambda row: {"item_id": row["item_id"] + "-x"})
    other.save_to_disk(str(tmp_path / "other"))
    (run / "run_config.json").write_text(json.dumps({"script": {"data_dir": str(tmp_path / "other")}}))
    sentinel = torch.randn(len(other["items"]), TINY_CONFIG["hidden_size"])
    write_trainer_index(run, sentinel)
    loaded = load_for_inference(str(run), device="cpu")
    vectors, how = item_index_for(loaded, *prompts_and_ids(loaded, data_dir), use_cache=False)
    assert not torch.equal(vectors, sentinel) and how.startswith("built")


def test_cached_index_is_reused_for_the_same_weights_only(
    model_dir, data_dir, smol_tokenizer, tmp_path, index_cache
):
    loaded = load_for_inference(str(model_dir), device="cpu")
    prompts, ids = prompts_and_ids(loaded, data_dir)
    first, how = item_index_for(loaded, prompts, ids)
    assert how.startswith("built") and len(list((index_cache / "item_index").glob("*.pt"))) == 1
    again, how = item_index_for(load_for_inference(str(model_dir), device="cpu"), prompts, ids)
    assert how.startswith("reused") and torch.equal(first, again)

    other = load_for_inference(str(save_model_dir(tmp_path / "other", smol_tokenizer, seed=3)), device="cpu")
    _, how = item_index_for(other, prompts, ids)
    assert how.startswith("built")
    _, how = item_index_for(loaded, prompts[:-1], ids[:-1])  # another catalog
    assert how.startswith("built")


def test_adapter_whose_base_folder_is_gone_loads_the_run_config_model(
    model_dir, data_dir, smol_tokenizer, tmp_path
):
    run = make_training_output(tmp_path / "run", model_dir, smol_tokenizer, data_dir)
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "/elsewhere/cache/models/tiny"
    (run / "adapter_config.json").write_text(json.dumps(adapter_config))
    loaded = load_for_inference(str(run), device="cpu")
    assert str(model_dir) in loaded.description

    (run / "run_config.json").unlink()
    with pytest.raises(RuntimeError, match=r"adapter_config.json.*/elsewhere/cache/models/tiny"):
        load_for_inference(str(run), device="cpu")
