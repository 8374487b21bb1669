"""The RecPO model card (recipes/model_card.py), rendered from a real tiny run folder of `recipes.recpo.main`:
Hub-valid front matter, the base model by its Hub id and never a local path, the data's counts, the recipe's
departures from the paper, the metrics with their intervals, a quick start that runs as written, the citation."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from recipes import model_card, recommend
from recipes.intervals import bootstrap_intervals, format_interval
from recipes.modeling import EMBEDDED_HUB_ID, EMBEDDED_MODEL

FAST = ["--threads", "1", "--item-batch-size", "64", "--dtype", "float32"]


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card; the front matter must be YAML between the first two `---` lines."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def card_of(run: Path) -> tuple[dict, str]:
    return split_card((run / "README.md").read_text(encoding="utf-8"))


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, copy)
    return copy


def as_embedded_run(run: Path) -> Path:
    """The run folder as if trained from the embedded default (run_config.json names it)."""
    config = json.loads((run / "run_config.json").read_text())
    config["model"]["model_name_or_path"] = EMBEDDED_MODEL
    (run / "run_config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECPO_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ front matter


def test_the_run_writes_a_recpo_card_with_hub_front_matter(tiny_run):
    meta, body = card_of(tiny_run)
    assert meta["library_name"] == "peft"
    assert {"recommendation", "recpo", "trl", "peft"} <= set(meta["tags"])
    assert meta["datasets"] == ["McAuley-Lab/Amazon-Reviews-2023"]  # the synthetic data poses as Amazon 2023
    assert meta["license"] == "unknown"  # a local base model that names no Hub id
    assert "base_model" not in meta
    assert body.startswith(f"\n# {tiny_run.name}\n")
    assert "fine-tuned version of [None]" not in body and "time machine" not in body  # not TRL's card


def test_the_model_index_holds_the_results_json_metrics(tiny_run):
    meta, _ = card_of(tiny_run)
    results = json.loads((tiny_run / "results.json").read_text())
    (index,) = meta["model-index"]
    assert index["name"] == tiny_run.name
    found = {}
    for entry in index["results"]:
        assert entry["task"]["type"] == "recommendation"
        for metric in entry["metrics"]:
            found[(entry["dataset"]["split"], metric["type"])] = metric["value"]
    expected = {(split, m): round(v, 4) for split in ("valid", "test") for m, v in results[split].items()}
    assert found == expected


def test_the_card_names_no_local_path(tiny_run, tiny_model_dir, synthetic_data):
    text = (tiny_run / "README.md").read_text()
    for local in (
        tiny_run.resolve(),
        tiny_model_dir,
        synthetic_data,
        Path.home(),
        Path(tempfile.gettempdir()),
    ):
        assert str(local) not in text
    assert "a local model" in text


def test_the_embedded_default_is_named_by_its_hub_id_with_its_license(tiny_run, tmp_path):
    run = as_embedded_run(copy_run(tiny_run, tmp_path))
    meta, body = split_card(model_card.render_card(run))
    assert meta["base_model"] == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert f"[{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID})" in body
    assert "Q4_1 GGUF" in body  # the weights it was trained on differ from the Hub's by the quantisation


def test_another_hub_base_model_links_its_own_license():
    assert model_card.public_base_model({"model": {"model_name_or_path": "Qwen/Qwen2.5-3B-Instruct"}}) == (
        "Qwen/Qwen2.5-3B-Instruct"
    )
    fields = model_card.base_license("Qwen/Qwen2.5-3B-Instruct")
    assert fields["license"] == "other" and fields["license_link"].endswith("/Qwen/Qwen2.5-3B-Instruct")


def test_a_local_folder_is_named_by_the_hub_id_its_config_names(tmp_path):
    folder = tmp_path / "my-models" / "qwen"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-3B-Instruct"}))
    assert (
        model_card.public_base_model({"model": {"model_name_or_path": str(folder)}})
        == "Qwen/Qwen2.5-3B-Instruct"
    )
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "somewhere")}))
    assert model_card.public_base_model({"model": {"model_name_or_path": str(folder)}}) is None


# ------------------------------------------------------------------ body


def test_the_card_reports_the_metrics_with_intervals_before_and_after(tiny_run):
    _, body = card_of(tiny_run)
    after = json.loads((tiny_run / "results.json").read_text())["per_user"]["test"]["rank"]
    before = json.loads((tiny_run / "results_before.json").read_text())["per_user"]["test"]["rank"]
    test_table = body.split("**test**, 4 users", 1)[1]
    row = next(line for line in test_table.splitlines() if line.startswith("| ndcg@10 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "ndcg@10",
        format_interval(bootstrap_intervals(before)["ndcg@10"], "ndcg@10"),
        format_interval(bootstrap_intervals(after)["ndcg@10"], "ndcg@10"),
    ]
    assert "Trained minus untrained, paired on 4 users" in test_table


def test_the_card_reports_the_data_and_its_stats_counts(tiny_run, synthetic_data):
    _, body = card_of(tiny_run)
    stats = json.loads((synthetic_data / "stats.json").read_text())["summary"]
    counts = f"{stats['users']:,} / {stats['items']:,} / {stats['interactions']:,}"
    assert f"| Users / items / interactions | {counts} |" in body
    samples = " / ".join(f"{stats['samples'][s]:,}" for s in ("train", "valid", "test"))
    assert f"| Samples train / valid / test | {samples} |" in body
    assert "| History window | the 5 items before each target |" in body
    assert "| Category | Synthetic |" in body


def test_the_card_lists_the_departures_from_the_paper(tiny_run):
    _, body = card_of(tiny_run)
    departures = body.split("### Departures from the paper", 1)[1].split("###", 1)[0]
    for expected in (
        "`popularity_prior_weight`: `1.0` (the paper: `0.0`)",
        "`item_logq_correction`: `True` (the paper: `False`)",
        "`max_completion_length`: `8` (the paper: `640`)",
        "`learning_rate`: `0.001` (the paper: `1e-05`)",
        "LoRA r = 4, alpha = 8",
        "History window 5 (the paper: 20)",
        "Base weights in float32",
    ):
        assert expected in departures, expected
    others = body.split("### Other settings changed from RecPOConfig's defaults", 1)[1].split("##", 1)[0]
    assert "`eval_max_completion_length`: `6`" in others and "output_dir" not in others


def test_the_card_cites_the_paper(tiny_run):
    _, body = card_of(tiny_run)
    assert "arXiv:2505.16994" in body and "Towards Large Recommender Models with Reasoning" in body
    assert "DeepSeekMath" not in body


def test_the_quick_start_recommends_as_written(tiny_run, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path)
    _, body = card_of(run)
    command = next(line for line in body.splitlines() if line.startswith("python -m recipes.recommend"))
    words = shlex.split(command)
    monkeypatch.chdir(run.parent)  # "from the folder that holds" the run
    rec = recommend.main([*words[3:], *FAST])
    assert len(rec.items) == 10
    assert "Top 10" in capsys.readouterr().out


def test_baselines_in_the_run_folder_are_shown_on_the_run_users(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    own = json.loads((run / "results.json").read_text())["per_user"]["test"]
    # A baseline that scored the run's users and more: only the run's users count, in a column of their own.
    ranks = {i: 1 for i in own["sample_index"]} | {max(own["sample_index"]) + 1: 50}
    baseline = {"test": {}, "per_user": {"test": {"sample_index": list(ranks), "rank": list(ranks.values())}}}
    (run / "baselines").mkdir()
    (run / "baselines" / "popularity.json").write_text(json.dumps(baseline))
    _, body = split_card(model_card.render_card(run))
    table = body.split("**test**, 4 users", 1)[1]
    assert "| metric | untrained | trained | popularity |" in table
    row = next(line for line in table.splitlines() if line.startswith("| hit@5 |"))
    assert row.rstrip(" |").endswith("1.0000 [1.0000, 1.0000]")


def test_recipes_evaluate_out_refreshes_the_card_of_a_run(tiny_run, synthetic_data, tmp_path, monkeypatch):
    from recipes import evaluate

    run = copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    evaluate.main(
        ["--model", str(run), "--data", str(synthetic_data), "--max-users", "3", "--out", "ev/t3.json", *FAST]
    )
    assert json.loads((run / "evaluations" / "t3.json").read_text())["scoring"]["max_new_tokens"] == 6
    _, body = card_of(run)
    assert "| `evaluations/t3.json` | test | 3 | 6 | 1 |" in body


def test_trl_never_writes_its_card(tokenizer, synthetic_data, tmp_path):
    from tests.recipes.conftest import build_trainer

    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out")
    trainer.create_model_card(model_name="x")  # what TRL calls at every checkpoint and push
    assert not (tmp_path / "out" / "README.md").exists()
