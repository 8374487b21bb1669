"""`python -m recipes.recommend`: title matching, unknown titles, the printed top-K, and --user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import load_from_disk

from recipes import recommend
from tests.recipes.test_evaluate import FAST, build_dataset, model_cache, save_model_dir, smol_tokenizer

__all__ = ["model_cache", "smol_tokenizer"]  # session fixtures shared with test_evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECPO_CACHE", str(cache))
    return cache


def titles_of(data_dir: Path) -> list[str]:
    return list(load_from_disk(str(data_dir))["items"]["title"])


def ranked_lines(output: str) -> list[str]:
    after = output.split("history masked):\n", 1)[1]
    return [line for line in after.splitlines() if line.strip()[:1].isdigit()]


# ------------------------------------------------------------------ matching titles


def test_titles_match_case_and_whitespace_insensitively():
    titles = ["Toy Story (1995)", "Fargo (1996)"]
    rows, notes = recommend.match_titles(["  fargo   (1996) ", "TOY STORY (1995)"], titles)
    assert rows == [1, 0] and notes == []


def test_a_title_shared_by_several_items_resolves_to_the_first_and_says_so():
    rows, notes = recommend.match_titles(
        ["Hamlet (1996)"], ["Fargo (1996)", "Hamlet (1996)", "Hamlet (1996)"]
    )
    assert rows == [1] and len(notes) == 1 and "2 catalog items" in notes[0]


def test_unknown_titles_are_an_error_listing_the_closest_matches():
    titles = ["Toy Story (1995)", "Fargo (1996)", "Star Wars (1977)"]
    with pytest.raises(recommend.TitleError) as err:
        recommend.match_titles(["Fargo (1996)", "toy story", "Star Wars", "qqqqqq"], titles)
    message = str(err.value)
    assert message.startswith("3 title(s) match no catalog item")
    assert "'toy story': closest catalog titles: 'Toy Story (1995)'" in message
    assert "'Star Wars': closest catalog titles: 'Star Wars (1977)'" in message
    assert "'qqqqqq': closest catalog titles: nothing close" in message


def test_history_needs_at_least_one_title():
    with pytest.raises(recommend.TitleError):
        recommend.split_history(" ; ;")


# ------------------------------------------------------------------ the command


def test_unknown_title_stops_the_command_before_loading_the_model(data_dir, tmp_path):
    title = titles_of(data_dir)[3]
    with pytest.raises(SystemExit, match=re.escape(f"closest catalog titles: {title!r}")):
        recommend.main(
            [
                "--model",
                str(tmp_path / "never-loaded"),
                "--data",
                str(data_dir),
                "--history",
                title[:-1],
                *FAST,
            ]
        )


def test_recommend_prints_reasoning_and_top_k_without_the_history(model_dir, data_dir, capsys):
    titles = titles_of(data_dir)
    history = [titles[0], titles[5].upper()]
    rec = recommend.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_dir),
            "--history",
            "; ".join(history),
            "--k",
            "5",
            *FAST,
        ]
    )
    out = capsys.readouterr().out
    assert "Reasoning:\n" in out and "History (oldest first):" in out
    lines = ranked_lines(out)
    assert len(lines) == 5 and len(rec.items) == 5
    assert not {0, 5} & set(rec.items)
    for line, row, score in zip(lines, rec.items, rec.scores, strict=True):
        assert line.endswith(titles[row]) and f"{score:.4f}" in line
    assert rec.scores == sorted(rec.scores, reverse=True)


def test_user_takes_the_latest_sample_and_reports_the_held_out_item(model_dir, data_dir, capsys):
    data = load_from_disk(str(data_dir))
    user = data["test"][0]["user_id"]
    split, row = recommend.latest_sample(data, user)
    assert split == "test"
    mine = [r for r in data["test"] if r["user_id"] == user]
    assert row["timestamp"] == max(r["timestamp"] for r in mine)

    rec = recommend.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_dir),
            "--user",
            user,
            "--k",
            "3",
            "--no-reasoning",
            *FAST,
        ]
    )
    out = capsys.readouterr().out
    titles = titles_of(data_dir)
    assert "Reasoning: none" in out and f"Held-out next item (test): {titles[row['target']]}, rank " in out
    assert len(ranked_lines(out)) == 3 and not set(row["history"]) & set(rec.items)


def test_unknown_user_is_an_error_naming_the_user(data_dir):
    with pytest.raises(SystemExit, match="--user nobody: no sample of this user"):
        recommend.main(["--model", "unused", "--data", str(data_dir), "--user", "nobody"])
