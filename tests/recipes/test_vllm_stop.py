"""With `use_vllm`, the answer marker reaches vLLM as a stop string (kept in the output): TRL 1.16 hands
`args.generation_kwargs` to vLLM's SamplingParams, which `recipes.evaluation.stop_at_marker` never sees. Checked at
that boundary, without vLLM: the kwargs the trainer gives TRL's vLLM backend, merged as TRL merges them."""

from __future__ import annotations

from recipes.config import RecPOConfig
from tests.recipes.conftest import build_trainer


def config(tmp_path, **fields) -> RecPOConfig:
    return RecPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)


def test_vllm_generation_stops_at_the_marker_and_keeps_it(tmp_path):
    kwargs = config(tmp_path, use_vllm=True).generation_kwargs
    assert kwargs == {"stop": ["<answer>"], "include_stop_str_in_output": True}


def test_a_users_own_stop_strings_and_settings_are_kept(tmp_path):
    given = '{"stop": ["###"], "include_stop_str_in_output": false, "seed": 3}'  # as a command line gives it
    kwargs = config(tmp_path, use_vllm=True, answer_marker="<rec>", generation_kwargs=given).generation_kwargs
    assert kwargs == {"stop": ["###", "<rec>"], "include_stop_str_in_output": False, "seed": 3}


def test_transformers_generation_gets_no_vllm_stop_strings(tmp_path):
    assert config(tmp_path).generation_kwargs is None  # `stop` is no GenerationConfig field
    assert config(tmp_path, use_vllm=True, reasoning=False).generation_kwargs is None  # no rollouts


def test_the_trainer_hands_the_marker_to_vllms_sampling_params(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    import trl.trainer.grpo_trainer as grpo

    handed = {}

    class FakeVLLMGeneration:  # TRL's vLLM backend, which would start vLLM
        def __init__(self, **kwargs):
            handed.update(kwargs)

    monkeypatch.setattr(grpo, "VLLMGeneration", FakeVLLMGeneration)
    build_trainer(tokenizer, synthetic_data, tmp_path / "out", use_vllm=True, vllm_mode="colocate")
    # What VLLMGeneration (colocate) passes to SamplingParams: its own settings, updated with generation_kwargs.
    sampling_params = {"n": 1, "max_tokens": handed["max_completion_length"], **handed["generation_kwargs"]}
    assert "<answer>" in sampling_params["stop"] and sampling_params["include_stop_str_in_output"] is True
