"""Rollouts generated with the LoRA adapter merged into the base weights: the same completions, the same
weights afterwards (also when generation fails), and no merge where it would change either."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import GenerationConfig
from trl import GRPOTrainer

from recipes import trainer as trainer_module
from tests.recipes.conftest import build_tiny_model, build_trainer

NEW_TOKENS = 12


def lora_trainer(tokenizer, data_dir, output_dir, model=None, **config):
    """A trainer on the tiny model with a non-zero adapter, sampling greedily, in train mode as TRL generates.

    Rollouts go through TRL's generate (fast_rollouts off) unless a test asks for RecPO's own loop.
    """
    config = {"fast_rollouts": False, **config}
    trainer = build_trainer(
        tokenizer,
        data_dir,
        output_dir,
        model=model,
        random_lora_b=True,
        max_completion_length=NEW_TOKENS,
        **config,
    )
    greedy = trainer.generation_config.to_dict()
    greedy.update(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None)
    trainer.generation_config = GenerationConfig.from_dict(greedy)
    trainer.model.train()
    return trainer


def prompts(trainer) -> list[list[int]]:
    rows = [trainer.train_dataset[i] for i in (0, 1, 2)]
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    return prompt_ids


def merged_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m.merged]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def watch_merges(monkeypatch) -> list[bool]:
    """Record, at each of TRL's generation calls, whether the adapter was merged during it."""
    seen: list[bool] = []
    original = GRPOTrainer._generate_single_turn

    def spy(self, *args, **kwargs):
        seen.append(bool(merged_layers(self.model)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", spy)
    return seen


def generate(trainer) -> list[list[int]]:
    completions, _ = trainer._generate_single_turn(prompts(trainer), None, {}, 1)
    return completions


def test_merged_adapter_gives_the_same_greedy_completions(tokenizer, synthetic_data, tmp_path, monkeypatch):
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out")
    seen = watch_merges(monkeypatch)
    merged = generate(trainer)
    trainer.args.merge_adapters_for_generation = False
    unmerged = generate(trainer)
    with trainer.model.disable_adapter():
        base = generate(trainer)

    assert seen == [True, False, False]
    assert merged == unmerged
    assert merged != base  # the adapter changes the completions: the comparison above is not vacuous
    assert all(len(ids) > NEW_TOKENS // 2 for ids in merged)


def test_the_fast_rollout_loop_also_samples_from_the_merged_adapter(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out", fast_rollouts=True)
    seen: list[bool] = []
    loop = trainer_module.reason_and_encode

    def spy(*args, **kwargs):
        seen.append(bool(merged_layers(trainer.model)))
        return loop(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "reason_and_encode", spy)
    merged = generate(trainer)
    trainer.args.merge_adapters_for_generation = False
    unmerged = generate(trainer)
    trainer.args.fast_rollouts = False
    assert generate(trainer) == merged  # TRL's generate, greedy: the same completions

    assert seen == [True, False]
    assert merged == unmerged
    assert merged_layers(trainer.model) == []


def test_weights_are_restored_and_unmerged_after_generation(tokenizer, synthetic_data, tmp_path, monkeypatch):
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out")
    seen = watch_merges(monkeypatch)
    before = snapshot(trainer.model)
    generate(trainer)

    assert seen == [True]
    assert merged_layers(trainer.model) == []
    after = snapshot(trainer.model)
    assert after.keys() == before.keys()
    for name, weight in before.items():
        assert weight.dtype == torch.float32
        # merge then unmerge in float32: bit-for-bit or float32 rounding of the tensor's largest entry
        assert (after[name] - weight).abs().max() <= 1e-6 * weight.abs().max(), name
    assert sum(torch.equal(after[n], w) for n, w in before.items()) > 0.5 * len(before)


def test_weights_are_unmerged_when_generation_raises(tokenizer, synthetic_data, tmp_path, monkeypatch):
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out")
    before = snapshot(trainer.model)
    seen: list[bool] = []

    def failing(self, *args, **kwargs):
        seen.append(bool(merged_layers(self.model)))
        raise RuntimeError("generation failed")

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", failing)
    with pytest.raises(RuntimeError, match="generation failed"):
        generate(trainer)

    assert seen == [True]  # it was merged when generation failed
    assert merged_layers(trainer.model) == []
    after = snapshot(trainer.model)
    for name, weight in before.items():
        assert (after[name] - weight).abs().max() <= 1e-6 * weight.abs().max(), name


def watch_adapters(monkeypatch) -> list[tuple[bool, float]]:
    """At each of TRL's generation calls: whether the adapters were disabled, and a base weight's first element."""
    seen: list[tuple[bool, float]] = []
    original = GRPOTrainer._generate_single_turn

    def spy(self, *args, **kwargs):
        layer = next(m for m in self.model.modules() if isinstance(m, BaseTunerLayer))
        seen.append((layer.disable_adapters, layer.get_base_layer().weight.flatten()[0].item()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", spy)
    return seen


def test_a_bf16_model_generates_from_merged_copies_and_keeps_its_weights(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    model = build_tiny_model(tokenizer).to(torch.bfloat16)
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out", model=model)
    seen = watch_adapters(monkeypatch)
    before = snapshot(trainer.model)
    merged = generate(trainer)

    # During generation: the adapter disabled, the base weights replaced by W + B A rounded once to bf16.
    layer = next(m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))
    weight = layer.get_base_layer().weight
    folded = (weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert seen == [(True, folded.flatten()[0].item())] and folded.flatten()[0] != weight.flatten()[0]
    # After it: every weight bit for bit as before, the adapter active again, nothing marked merged.
    after = snapshot(trainer.model)
    assert all(torch.equal(after[name], w) for name, w in before.items())
    assert not layer.disable_adapters and merged_layers(trainer.model) == []
    # The completions are those of a plain bf16 model holding W + B A, formed in float32 and rounded once.
    state = {}
    for name, module in trainer.model.get_base_model().named_modules():
        if isinstance(module, BaseTunerLayer):
            delta = module.get_delta_weight("default").float()
            state[f"{name}.weight"] = (module.get_base_layer().weight.float() + delta).to(torch.bfloat16)
    plain = build_tiny_model(tokenizer).to(torch.bfloat16)
    assert plain.load_state_dict(state, strict=False).unexpected_keys == []
    reference = lora_trainer(
        tokenizer, synthetic_data, tmp_path / "plain", model=plain, merge_adapters_for_generation=False
    )
    with reference.model.disable_adapter():
        assert generate(reference) == merged


def test_a_bf16_model_gets_its_weights_back_when_generation_raises(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    model = build_tiny_model(tokenizer).to(torch.bfloat16)
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out", model=model)
    before = snapshot(trainer.model)

    def failing(self, *args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", failing)
    with pytest.raises(RuntimeError, match="generation failed"):
        generate(trainer)
    after = snapshot(trainer.model)
    assert all(torch.equal(after[name], w) for name, w in before.items())
    assert not any(m.disable_adapters for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))


def test_active_lora_dropout_is_not_merged_in_train_mode(tokenizer, synthetic_data, tmp_path, monkeypatch):
    """An unmerged adapter applies its dropout in train mode (TRL's mode during training); a merged one cannot."""
    trainer = lora_trainer(tokenizer, synthetic_data, tmp_path / "out")
    for module in trainer.model.modules():
        if isinstance(module, BaseTunerLayer):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    seen = watch_merges(monkeypatch)
    generate(trainer)
    trainer.model.eval()  # dropout off: merging changes nothing again
    generate(trainer)

    assert seen == [False, True]
    assert merged_layers(trainer.model) == []


def test_model_without_adapter_generates_as_before(tokenizer, synthetic_data, tmp_path, monkeypatch):
    trainer = build_trainer(
        tokenizer, synthetic_data, tmp_path / "out", lora=False, max_completion_length=4, fast_rollouts=False
    )
    seen = watch_merges(monkeypatch)
    assert trainer._peft_model_to_merge() is None
    assert len(generate(trainer)) == 3
    assert seen == [False]
