"""Every shipped recipe parses into the entry point's dataclasses, the way `recipes/recpo.py --config` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl import ModelConfig, TrlParser

from recipes.config import RecPOConfig, ScriptArguments

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs").rglob("*.yaml"))


def test_there_are_recipes_to_check():
    names = {str(p.relative_to(p.parents[2])) for p in RECIPES}
    assert "smollm2-135m/movielens/recpo.yaml" in names
    assert "smollm2-135m/movielens/recpo-gpu.yaml" in names
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_recipe_parses_with_the_entry_points_parser(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output folders a parse may create stay out of the repository
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(
        args=["--config", str(recipe), "--bf16", "false", "--report_to", "none"]
    )
    assert model_args.model_name_or_path
    assert script_args.data_dir
    assert training_args.output_dir.startswith("outputs/")
    assert training_args.per_device_train_batch_size % training_args.num_generations == 0
    assert training_args.similarity_temperature == pytest.approx(0.02)


def test_a_misspelt_recipe_key_is_refused(tmp_path):
    """What makes the test above worth having: a typo in a recipe does not silently fall back to a default."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        "model_name_or_path: x\ndata_dir: d\noutput_dir: outputs/x\nitem_logq_corection: true\n"
    )
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    with pytest.raises(ValueError, match="item_logq_corection"):
        parser.parse_args_and_config(args=["--config", str(recipe), "--bf16", "false"])
