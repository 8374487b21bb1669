"""The untrained model's evaluation is read back from $RECPO_CACHE/evaluations when nothing it depends on changed."""

from __future__ import annotations

import json

import pytest

from recipes import recpo
from recipes.trainer import RecPOTrainer
from tests.recipes.conftest import recpo_args


@pytest.fixture
def counted_evaluations(monkeypatch, tmp_path):
    """A private cache folder, and the number of ranking evaluations each run performs."""
    monkeypatch.setenv("RECPO_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    original = RecPOTrainer.ranking_evaluation

    def counted(self, splits):
        calls.append(1)
        return original(self, splits)

    monkeypatch.setattr(RecPOTrainer, "ranking_evaluation", counted)
    return calls


def run(tiny_model_dir, synthetic_data, out, **overrides) -> dict:
    args = recpo_args(out, tiny_model_dir, synthetic_data, evaluate_before=True, max_steps=1, **overrides)
    recpo.main(*args)
    return json.loads((out / "results_before.json").read_text())


def test_a_second_run_reads_the_untrained_evaluation_from_the_cache(
    tiny_model_dir, synthetic_data, tmp_path, counted_evaluations
):
    first = run(tiny_model_dir, synthetic_data, tmp_path / "a")
    assert len(counted_evaluations) == 2  # before and after training
    second = run(tiny_model_dir, synthetic_data, tmp_path / "b")
    assert len(counted_evaluations) == 3  # only after training: "before" came from the cache
    assert second == first
    assert len(list((tmp_path / "cache" / "evaluations").iterdir())) == 1


@pytest.mark.parametrize(
    "change", [{"max_eval_users": 3}, {"eval_max_completion_length": 5}, {"similarity_temperature": 0.05}]
)
def test_other_users_or_settings_are_evaluated_again(
    tiny_model_dir, synthetic_data, tmp_path, counted_evaluations, change
):
    run(tiny_model_dir, synthetic_data, tmp_path / "a")
    run(tiny_model_dir, synthetic_data, tmp_path / "b", **change)
    assert len(counted_evaluations) == 4
    assert len(list((tmp_path / "cache" / "evaluations").iterdir())) == 2


def test_the_cache_can_be_turned_off(tiny_model_dir, synthetic_data, tmp_path, counted_evaluations):
    run(tiny_model_dir, synthetic_data, tmp_path / "a", cache_untrained_evaluation=False)
    run(tiny_model_dir, synthetic_data, tmp_path / "b", cache_untrained_evaluation=False)
    assert len(counted_evaluations) == 4
    assert not (tmp_path / "cache" / "evaluations").exists()
