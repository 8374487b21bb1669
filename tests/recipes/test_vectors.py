"""User and item vectors (recipes/vectors.py): the final-norm hook, the encoders and the answer marker.

A tiny random Llama with SmolLM2's real tokenizer stands in for the backbone. For greedy decoding, a
"chain" model is planted: attention and MLP outputs are shrunk (they still mix context a little) and an
untied LM head maps each token of a chosen script to the next one, so greedy decoding writes that script
and both decoding paths can be compared on the marker written mid-text, after EOS, and at the length limit.
"""

from __future__ import annotations

import pytest
import torch

from recipes.decoding import reason_and_encode
from recipes.evaluation import greedy_reasoning, render_user_prompt
from recipes.vectors import (
    MarkerCloser,
    capture_final_hidden,
    encode_sequences,
    encode_shared_prefix,
    last_token_hidden,
    left_pad,
    prefill,
)
from tests.numerics import assert_close_at_scale, assert_dicts_close_at_scale
from tests.recipes.conftest import chain_model

MARKER = "<answer>"


@pytest.fixture
def closer(tokenizer) -> MarkerCloser:
    return MarkerCloser(tokenizer, MARKER)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- the final-norm hook


def test_hook_at_marker_equals_last_hidden_state_of_plain_forward(tiny_model, tokenizer):
    texts = ["I liked the first two films.\n<answer>", "Short one <answer>", "x <answer>"]
    ids, mask = left_pad([ids_of(tokenizer, t) for t in texts], tokenizer.pad_token_id)
    with torch.no_grad(), capture_final_hidden(tiny_model) as capture:
        out = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    reference = out.hidden_states[-1]  # (3, len, d), after the final norm
    assert capture.hidden.shape == reference.shape
    # The marker's last token is the last column of a left-padded batch; check every real position too.
    torch.testing.assert_close(capture.hidden[:, -1], reference[:, -1])
    torch.testing.assert_close(capture.hidden[mask.bool()], reference[mask.bool()])
    # And the hook's value is what the LM head reads: the logits follow from it.
    assert_close_at_scale(tiny_model.lm_head(capture.hidden[:, -1]), out.logits[:, -1])


def test_last_token_hidden_reads_the_marker_of_every_left_padded_row(tiny_model, tokenizer):
    sequences = [
        ids_of(tokenizer, "A much longer history of films <answer>"),
        ids_of(tokenizer, "B <answer>"),
    ]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = last_token_hidden(tiny_model, ids, mask)
        alone = [
            tiny_model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1]
            for s in sequences
        ]
    assert_close_at_scale(batched, torch.stack(alone))


def test_last_token_hidden_at_explicit_positions_of_a_right_padded_completion(tiny_model, tokenizer):
    # The trainer's layout: left-padded prompt, right-padded completion; the marker ends each completion.
    prompts = [ids_of(tokenizer, "history one"), ids_of(tokenizer, "a longer history two")]
    completions = [ids_of(tokenizer, "short <answer>"), ids_of(tokenizer, "a longer reasoning\n<answer>")]
    p_ids, p_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(len(c) for c in completions)
    c_ids = torch.full((2, width), tokenizer.pad_token_id)
    c_mask = torch.zeros((2, width), dtype=torch.long)
    for row, c in enumerate(completions):
        c_ids[row, : len(c)] = torch.tensor(c)
        c_mask[row, : len(c)] = 1
    positions = p_ids.size(1) + c_mask.sum(1) - 1
    with torch.no_grad():
        got = last_token_hidden(
            tiny_model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), positions
        )
        want = encode_sequences(tiny_model, [p + c for p, c in zip(prompts, completions, strict=True)], 0)
    assert_close_at_scale(got, want)


# ----------------------------------------------------------------------------- item encoders


def test_encode_shared_prefix_equals_encode_sequences(tiny_model, tokenizer, synthetic_data):
    from datasets import load_from_disk

    from recipes.evaluation import render_item_prompt

    items = load_from_disk(str(synthetic_data))["items"]
    prompts = [render_item_prompt(tokenizer, p) for p in items["prompt"][:12]]
    assert len({len(p) for p in prompts}) > 1  # suffixes of different lengths exercise the right padding
    with torch.no_grad():
        plain = encode_sequences(tiny_model, prompts, tokenizer.pad_token_id, batch_size=5)
        shared = encode_shared_prefix(tiny_model, prompts, tokenizer.pad_token_id, batch_size=5)
    assert_close_at_scale(shared, plain)


# ----------------------------------------------------------------------------- MarkerCloser


def test_marker_closer_cuts_right_after_a_marker_that_follows_a_space(tokenizer, closer):
    ids = ids_of(tokenizer, "I think so <answer> and more text")
    closed, wrote = closer.close(ids)
    assert wrote
    assert tokenizer.decode(closed) == "I think so <answer>"
    assert closed == ids[: len(closed)]


def test_marker_closer_cuts_right_after_a_marker_that_follows_a_newline(tokenizer, closer):
    ids = ids_of(tokenizer, "I think so.\n<answer>\nmore")
    closed, wrote = closer.close(ids)
    assert wrote
    assert tokenizer.decode(closed) == "I think so.\n<answer>"


def test_marker_closer_appends_the_marker_after_dropping_the_trailing_eos(tokenizer, closer):
    ids = ids_of(tokenizer, "I think so") + [tokenizer.eos_token_id]
    closed, wrote = closer.close(ids)
    assert not wrote
    assert closed == ids[:-1] + ids_of(tokenizer, MARKER)


def test_marker_closer_appends_the_marker_at_the_length_limit(tokenizer, closer):
    ids = ids_of(tokenizer, "I think so and then")
    closed, wrote = closer.close(ids)
    assert not wrote
    assert closed == ids + ids_of(tokenizer, MARKER)


def test_marker_closer_finds_a_marker_split_across_unusual_tokens(tokenizer, closer):
    # "<" + "answer>" spelled with other ids than the canonical encoding: found from the text.
    ids = (
        ids_of(tokenizer, "so <")
        + ids_of(tokenizer, "answer")
        + ids_of(tokenizer, ">")
        + ids_of(tokenizer, " x")
    )
    closed, wrote = closer.close(ids)
    assert wrote
    assert tokenizer.decode(closed) == "so <answer>"


# ----------------------------------------------------------------------------- greedy decoding


def test_greedy_reason_and_encode_matches_generate_and_encode_sequences(tokenizer, closer):
    marker = ids_of(tokenizer, MARKER)
    space_marker = ids_of(tokenizer, "Because I liked it <answer> then")  # marker after a space, then more
    newline_marker = ids_of(tokenizer, "Mostly dramas.\n<answer> then")  # marker after a newline, then more
    eos_no_marker = ids_of(tokenizer, "No idea") + [tokenizer.eos_token_id]  # stops without the marker
    rambling = ids_of(tokenizer, "one two three four five six seven eight nine ten eleven")  # length limit
    starts = ids_of(tokenizer, " alpha beta gamma delta")
    scripts = dict(zip(starts, [space_marker, newline_marker, eos_no_marker, rambling], strict=True))
    model = chain_model(tokenizer, scripts)
    history = ids_of(tokenizer, "User history:")
    prompts = [history + [s] for s in starts[:2]] + [history[:1] + [s] for s in starts[2:]]  # ragged
    max_new = 8

    vectors, completions, wrote = reason_and_encode(model, tokenizer, prompts, closer, max_new, batch_size=4)
    generated, found = greedy_reasoning(model, tokenizer, prompts, closer, max_new, batch_size=4)

    cut = space_marker.index(marker[-1]) + 1
    assert completions[0] == space_marker[:cut]
    assert tokenizer.decode(completions[1]).endswith("\n<answer>")
    assert completions[2] == eos_no_marker[:-1] + marker
    assert completions[3] == rambling[:max_new] + marker
    assert wrote == [True, True, False, False]
    assert completions == generated
    assert found == wrote
    with torch.no_grad():
        expected = encode_sequences(
            model, [p + c for p, c in zip(prompts, completions, strict=True)], tokenizer.pad_token_id
        )
    assert_close_at_scale(vectors, expected)


def test_greedy_reason_and_encode_on_a_random_model_equals_encode_sequences(tiny_model, tokenizer, closer):
    prompts = [
        render_user_prompt(tokenizer, [{"role": "user", "content": c}], True, MARKER)
        for c in ("Recommend me a film.", "I watched Heat and Alien; what next?", "hi")
    ]
    vectors, completions, wrote = reason_and_encode(tiny_model, tokenizer, prompts, closer, 6, batch_size=2)
    generated, found = greedy_reasoning(tiny_model, tokenizer, prompts, closer, 6, batch_size=2)
    assert completions == generated
    assert found == wrote
    assert all(tokenizer.decode(c).endswith(MARKER) for c in completions)
    with torch.no_grad():
        expected = encode_sequences(
            tiny_model, [p + c for p, c in zip(prompts, completions, strict=True)], tokenizer.pad_token_id
        )
    assert_close_at_scale(vectors, expected)


# ----------------------------------------------------------------------------- prefill


def test_prefill_of_repeated_prompts_equals_a_plain_forward_in_values_and_gradients(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    chats = ["I liked Heat and Alien.", "Only comedies, please", "x"]
    prompts = [render_user_prompt(tokenizer, [{"role": "user", "content": c}], True, MARKER) for c in chats]
    rows = [prompts[1], prompts[0], prompts[1], prompts[2], prompts[0]]  # repeats, out of order
    weights = torch.randn(len(rows), model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def run(encode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        vectors = encode()
        (vectors * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return vectors.detach(), grads

    with torch.no_grad(), capture_final_hidden(model) as capture:
        state = prefill(model, rows, tokenizer.pad_token_id)
    # Positions the backbone ran: the shared opening once, then each distinct prompt's rest (padded), once.
    ran = sum(h.shape[0] * h.shape[1] for h in capture.outputs)
    assert ran < sum(len(p) for p in prompts) < sum(len(p) for p in rows)
    shared, shared_grads = run(lambda: prefill(model, rows, tokenizer.pad_token_id).last_hidden)
    plain, plain_grads = run(lambda: last_token_hidden(model, *left_pad(rows, tokenizer.pad_token_id)))
    assert_close_at_scale(shared, plain)
    assert any("lora_A" in n for n in shared_grads)
    assert_dicts_close_at_scale(shared_grads, plain_grads)
    assert state.next_position.tolist() == [len(p) for p in rows]
