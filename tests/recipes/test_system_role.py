"""Chat templates without a system role (Gemma-2's raises "System role not supported"): the stored prompts'
system turn is folded into the user turn wherever a prompt is rendered (user and item prompts, training
rollouts, evaluation, recommending), and templates that accept a system turn render exactly as before."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from data_prep.prompts import SYSTEM
from recipes import evaluate, recommend
from recipes.evaluation import render_item_prompt, render_user_prompt
from tests.recipes.conftest import build_tiny_model, build_trainer

MARKER = "<answer>"
FAST = ["--max-new-tokens", "6", "--threads", "1", "--item-batch-size", "64", "--dtype", "float32"]
METRICS = {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}

# Written for these tests in the style of Gemma-2's template: no system role, user/model turns that must
# alternate, the assistant role shown as "model". transformers handles `continue_final_message` itself, by
# cutting the rendered text right after the final message's content.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Turns must alternate user, assistant, user, ...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
USER_TURN = "<start_of_turn>user\n" + SYSTEM + "\n\n"  # the system text opens the user turn


@pytest.fixture(scope="module")
def no_system_tokenizer(tokenizer):
    """The real SmolLM2 tokenizer with a template that rejects a system turn."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = NO_SYSTEM_TEMPLATE
    return copied


@pytest.fixture(scope="module")
def no_system_model_dir(tmp_path_factory, no_system_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-no-system")
    build_tiny_model(no_system_tokenizer).save_pretrained(folder)
    no_system_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def index_cache(tmp_path, monkeypatch) -> Path:
    """Item indexes of these random models go to the test's own folder, not the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECPO_CACHE", str(cache))
    return cache


def first_rows(data_dir: Path, split: str, count: int) -> list[dict]:
    return load_from_disk(str(data_dir))[split].select(range(count)).to_list()


def text_of(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_the_template_rejects_a_system_turn(no_system_tokenizer, synthetic_data):
    prompt = first_rows(synthetic_data, "train", 1)[0]["prompt"]
    assert prompt[0]["role"] == "system"
    with pytest.raises(Exception, match="System role not supported"):
        no_system_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("reasoning", [True, False])
def test_user_prompt_folds_the_system_text_into_the_user_turn(no_system_tokenizer, synthetic_data, reasoning):
    messages = first_rows(synthetic_data, "train", 1)[0]["prompt"]
    text = text_of(no_system_tokenizer, render_user_prompt(no_system_tokenizer, messages, reasoning, MARKER))
    assert text.startswith(no_system_tokenizer.bos_token + USER_TURN + messages[1]["content"])
    expected_end = "<start_of_turn>model\n" + ("" if reasoning else MARKER)
    assert text.endswith("<end_of_turn>\n" + expected_end)
    assert text.count(SYSTEM) == 1 and text.count("<start_of_turn>user") == 1


def test_item_prompt_folds_the_system_text_and_leaves_the_marker_open(no_system_tokenizer, synthetic_data):
    items = load_from_disk(str(synthetic_data))["items"]
    for messages in items.select(range(3))["prompt"]:
        assert messages[0]["role"] == "system" and messages[-1] == {"role": "assistant", "content": MARKER}
        text = text_of(no_system_tokenizer, render_item_prompt(no_system_tokenizer, messages))
        assert text.startswith(no_system_tokenizer.bos_token + USER_TURN + messages[1]["content"])
        assert text.endswith("<end_of_turn>\n<start_of_turn>model\n" + MARKER)


def test_a_template_with_a_system_role_renders_the_same_token_ids_as_before(
    tokenizer, synthetic_data, tmp_path
):
    """SmolLM2's ChatML keeps its system turn: the ids are those of the stored messages, unfolded, in the
    renderers and in the trainer's rollouts alike."""
    data = load_from_disk(str(synthetic_data))
    messages = data["train"][0]["prompt"]
    reasoning = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefilled = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": MARKER}], tokenize=False, continue_final_message=True
    )
    assert "<|im_start|>system\n" + SYSTEM in reasoning
    assert (
        render_user_prompt(tokenizer, messages, True, MARKER)
        == tokenizer(reasoning, add_special_tokens=False)["input_ids"]
    )
    assert (
        render_user_prompt(tokenizer, messages, False, MARKER)
        == tokenizer(prefilled, add_special_tokens=False)["input_ids"]
    )
    for item in data["items"].select(range(3))["prompt"]:
        text = tokenizer.apply_chat_template(item, tokenize=False, continue_final_message=True)
        assert render_item_prompt(tokenizer, item) == tokenizer(text, add_special_tokens=False)["input_ids"]
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", lora=False)
    rollout_ids, _, _ = trainer._tokenize_prompts([messages])
    assert rollout_ids[0] == tokenizer(reasoning, add_special_tokens=False)["input_ids"]


def test_the_template_is_probed_once_per_tokenizer_and_template(
    no_system_tokenizer, synthetic_data, monkeypatch
):
    """A catalog of thousands of items must not probe the template for every prompt."""
    probing = copy.deepcopy(no_system_tokenizer)
    calls = []
    original = probing.apply_chat_template
    monkeypatch.setattr(probing, "apply_chat_template", lambda *a, **k: calls.append(1) or original(*a, **k))
    items = load_from_disk(str(synthetic_data))["items"].select(range(5))["prompt"]
    for messages in items:
        render_item_prompt(probing, messages)
    assert len(calls) == len(items) + 1  # one probe, then one rendering per item
    probing.chat_template = copy.deepcopy(no_system_tokenizer).chat_template + "{# changed #}"
    calls.clear()
    render_item_prompt(probing, items[0])
    assert len(calls) == 2  # a changed template is probed again


# ------------------------------------------------------------------ training


def test_trainer_generates_and_scores_rollouts_with_the_system_text_in_the_user_turn(
    no_system_tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(no_system_tokenizer, synthetic_data, tmp_path / "out")
    assert text_of(no_system_tokenizer, trainer.item_prompt_ids[0]).endswith(
        "<start_of_turn>model\n" + MARKER
    )
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    inputs = [dict(row) for row in rows for _ in range(2)]  # distinct dicts, as TRL's dataloader yields
    output = trainer._generate_and_score_completions(inputs)

    assert output["completion_ids"].size(0) == 4 and torch.isfinite(output["advantages"]).all()
    for prompt, mask, row in zip(output["prompt_ids"], output["prompt_mask"], inputs, strict=True):
        ids = prompt[mask.bool()].tolist()
        assert ids == render_user_prompt(no_system_tokenizer, row["prompt"], True, MARKER)
        assert USER_TURN in text_of(no_system_tokenizer, ids)


def test_trainer_builds_and_scores_a_no_reasoning_batch(no_system_tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(no_system_tokenizer, synthetic_data, tmp_path / "out", reasoning=False)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer._generate_and_score_completions([dict(row) for row in rows for _ in range(2)])
    for prompt, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True):
        text = text_of(no_system_tokenizer, prompt[mask.bool()].tolist())
        assert USER_TURN in text and text.endswith("<start_of_turn>model\n" + MARKER)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ evaluation and recommending


@pytest.mark.parametrize("reasoning", [True, False])
def test_evaluate_runs_on_a_model_whose_template_has_no_system_role(
    no_system_model_dir, synthetic_data, tmp_path, index_cache, reasoning
):
    out = tmp_path / "tiny.json"
    results = evaluate.main(
        ["--model", str(no_system_model_dir), "--data", str(synthetic_data), "--split", "test"]
        + ["--max-users", "4", "--out", str(out), *FAST, *([] if reasoning else ["--no-reasoning"])]
    )
    assert set(results["test"]) == METRICS and all(0.0 <= v <= 1.0 for v in results["test"].values())


def test_recommend_runs_on_a_model_whose_template_has_no_system_role(
    no_system_model_dir, synthetic_data, index_cache, capsys
):
    titles = list(load_from_disk(str(synthetic_data))["items"]["title"])
    base = ["--model", str(no_system_model_dir), "--data", str(synthetic_data), "--k", "3", *FAST]
    typed = recommend.main([*base, "--history", f"{titles[0]}; {titles[1]}"])
    assert len(typed.items) == 3 and not {0, 1} & set(typed.items)
    user = load_from_disk(str(synthetic_data))["test"][0]["user_id"]
    stored = recommend.main([*base, "--user", user, "--no-reasoning"])
    assert len(stored.items) == 3
    assert "Held-out next item (test)" in capsys.readouterr().out


def test_recpo_main_trains_and_evaluates_a_model_whose_template_has_no_system_role(
    no_system_model_dir, synthetic_data, tmp_path
):
    from recipes import recpo
    from tests.recipes.conftest import recpo_args

    args = recpo_args(tmp_path / "run", no_system_model_dir, synthetic_data, max_steps=1, evaluate_test=False)
    results = recpo.main(*args)
    assert set(results["valid"]) >= METRICS
