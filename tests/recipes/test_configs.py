"""Every shipped recipe parses into the entry point's dataclasses, the way `recipes/recpo.py --config` reads it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
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


@pytest.mark.parametrize("recipe", ["smollm2-135m/movielens/recpo.yaml", "qwen2.5-3b/video_games/recpo.yaml"])
def test_a_recipes_gradient_checkpointing_is_carried_over_without_the_rename_notice(
    recipe, tmp_path, monkeypatch
):
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing and warns when only the old name is
    set, as TRL's default and the recipes set it: the value must arrive under both names, with nothing printed."""
    monkeypatch.chdir(tmp_path)
    path = next(p for p in RECIPES if str(p).endswith(recipe))
    wanted = yaml.safe_load(path.read_text())["gradient_checkpointing"]
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, _ = parser.parse_args_and_config(
            args=["--config", str(path), "--bf16", "false", "--report_to", "none"]
        )
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert args.gradient_checkpointing is wanted and args.activation_checkpointing is wanted


def test_the_new_name_of_gradient_checkpointing_wins_over_the_old_one(tmp_path):
    args = RecPOConfig(
        output_dir=str(tmp_path),
        gradient_checkpointing=True,
        activation_checkpointing=False,
        report_to="none",
    )
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_a_misspelt_recipe_key_is_refused(tmp_path):
    """What makes the test above worth having: a typo in a recipe does not silently fall back to a default."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        "model_name_or_path: x\ndata_dir: d\noutput_dir: outputs/x\nitem_logq_corection: true\n"
    )
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    with pytest.raises(ValueError, match="item_logq_corection"):
        parser.parse_args_and_config(args=["--config", str(recipe), "--bf16", "false"])


PAPER_RECIPES = [p for p in RECIPES if p.parent.parent.name in ("qwen2.5-3b", "gemma-2-2b")]


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_paper_recipes_carry_the_reference_implementations_effective_settings(recipe, tmp_path, monkeypatch):
    """DESIGN.md sections 3 and 3b: what the authors' launch runs, in our trainer's terms."""
    monkeypatch.chdir(tmp_path)
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    # bf16 cannot be parsed on a machine without a GPU: read it from the file, parse the rest.
    assert yaml.safe_load(recipe.read_text())["bf16"] is True
    _, args, model = parser.parse_args_and_config(
        args=["--config", str(recipe), "--report_to", "none", "--bf16", "false"]
    )
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (4, 128, 0.05)
    assert args.disable_dropout  # every dropout off, LoRA's included
    assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type) == (
        1e-5,
        32,
        "constant_with_warmup",
    )
    assert (args.num_generations, args.per_device_train_batch_size) == (4, 16)  # 4 users x 4 rollouts
    assert (args.temperature, args.top_k, args.max_completion_length) == (2.0, 50, 640)
    assert args.relabel_topk == 2 and args.item_loss_weight == 2.0  # token mean + 2 x item mean
    assert args.max_grad_norm == 0.25  # the reference's clipping at 1.0 of a 4x larger gradient
    assert args.optim == "paged_adamw_8bit" and args.gradient_checkpointing
    assert args.beta == 0.0 and (args.epsilon, args.epsilon_high) == (0.2, 0.28)
    assert args.item_warmup_steps == 0 and not args.item_logq_correction  # the paper's item loss
