"""RecPO's own decoding loop (recipes/decoding.py): sampled rollouts as transformers samples them.

With the same seed and the same batch order, `reason_and_encode` must draw the very tokens `generate` draws
(both take one `torch.multinomial` per step over the whole batch), close them as `MarkerCloser.close` does,
and return the user vector of a plain forward over prompt + completion.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from recipes.decoding import (
    UnsupportedSampling,
    _RoomyLayer,
    reason_and_encode,
    reserve_room,
    sampling_warpers,
    unsupported_head,
)
from recipes.evaluation import greedy_reasoning, render_user_prompt, stop_at_marker
from recipes.vectors import MarkerCloser, decoder, encode_sequences, left_pad, prefill
from tests.numerics import assert_close_at_scale

MARKER = "<answer>"


@pytest.fixture
def closer(tokenizer) -> MarkerCloser:
    return MarkerCloser(tokenizer, MARKER)


def user_prompts(tokenizer, texts, copies: int = 1) -> list[list[int]]:
    """Chat prompts (they share the chat template's opening), each repeated `copies` times in a row."""
    prompts = [render_user_prompt(tokenizer, [{"role": "user", "content": t}], True, MARKER) for t in texts]
    return [p for p in prompts for _ in range(copies)]


def sampled_by_generate(model, tokenizer, prompts, closer, config, seed):
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad(), stop_at_marker(model, tokenizer, MARKER):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    closed = []
    for row in out[:, ids.size(1) :].tolist():
        if tokenizer.eos_token_id in row:  # what TRL keeps: up to the first EOS
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        closed.append(closer.close(row))
    return closed


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": 50},
        {"temperature": 2.0, "top_k": 0, "top_p": 0.9},
        {"temperature": 0.7, "top_k": 20, "min_p": 0.01},
    ],
)
def test_sampled_rollouts_are_the_tokens_generate_samples_with_the_same_seed(
    tiny_model, tokenizer, closer, settings
):
    texts = ("Recommend me a film.", "I watched Heat and Alien; what next?", "hi")
    prompts = user_prompts(tokenizer, texts, copies=2)  # G = 2 rollouts of each prompt share one prefill
    # The loop sorts prompts by length: hand them over in that order so both draw rows in the same order.
    prompts.sort(key=lambda p: (len(p), tuple(p)))
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=7,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )
    want = sampled_by_generate(tiny_model, tokenizer, prompts, closer, config, seed=3)
    torch.manual_seed(3)
    vectors, completions, wrote = reason_and_encode(
        tiny_model, tokenizer, prompts, closer, 7, batch_size=len(prompts), warpers=sampling_warpers(config)
    )
    assert completions == [ids for ids, _ in want]
    assert wrote == [found for _, found in want]
    assert len({tuple(c) for c in completions}) > 3  # really sampled: copies of a prompt differ
    with torch.no_grad():
        plain = encode_sequences(
            tiny_model, [p + c for p, c in zip(prompts, completions, strict=True)], tokenizer.pad_token_id
        )
    assert_close_at_scale(vectors, plain)


def test_sampling_with_top_k_one_is_greedy_decoding(tiny_model, tokenizer, closer):
    prompts = user_prompts(tokenizer, ("A film please", "Something with robots in it"), copies=2)
    config = GenerationConfig(do_sample=True, top_k=1, temperature=1.5, max_new_tokens=6)
    _, sampled, _ = reason_and_encode(
        tiny_model, tokenizer, prompts, closer, 6, warpers=sampling_warpers(config)
    )
    greedy, _ = greedy_reasoning(tiny_model, tokenizer, prompts, closer, 6)
    assert sampled == greedy


def test_an_eos_sampled_before_the_marker_is_replaced_by_the_marker(tiny_model, tokenizer, closer):
    prompts = user_prompts(tokenizer, ("hello",))
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS the only token top-k = 1 can draw
        tiny_model.lm_head.weight[eos] = 50.0 * tiny_model.model.norm.weight.sign()
    _, completions, wrote = reason_and_encode(
        tiny_model,
        tokenizer,
        prompts,
        closer,
        5,
        warpers=sampling_warpers(GenerationConfig(do_sample=True, top_k=1)),
        eos_ids=[eos],
    )
    assert completions == [closer.marker_ids]
    assert wrote == [False]


def test_sampling_warpers_refuse_settings_the_loop_does_not_implement():
    with pytest.raises(UnsupportedSampling, match="repetition_penalty"):
        sampling_warpers(GenerationConfig(do_sample=True, repetition_penalty=1.2))
    with pytest.raises(UnsupportedSampling, match="no_repeat_ngram_size"):
        sampling_warpers(GenerationConfig(do_sample=True, no_repeat_ngram_size=3))
    assert len(sampling_warpers(GenerationConfig(do_sample=True, repetition_penalty=1.0, top_k=0))) == 0


def test_models_that_scale_their_logits_are_not_sampled_by_the_loop(tiny_model):
    assert unsupported_head(tiny_model) is None
    tiny_model.config.logit_scale = 0.5
    assert "logit_scale" in unsupported_head(tiny_model)


def decode_steps(model, tokenizer, prompts, steps: int, room: int | None):
    """Prefill `prompts`, then feed `steps` fixed tokens one at a time; with `room`, reserve it first.

    Returns the final hidden state of every step (steps, rows, d) and the prefilled cache."""
    backbone = decoder(model)
    with torch.no_grad():
        state = prefill(model, prompts, tokenizer.pad_token_id)
        if room is not None:
            reserve_room(state.cache, room)
        mask, position, hidden = state.mask, state.next_position, []
        for token in range(100, 100 + steps):
            mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
            out = backbone(
                input_ids=torch.full((mask.size(0), 1), token),
                attention_mask=mask,
                position_ids=position.unsqueeze(1),
                use_cache=True,
                **{state.cache_kw: state.cache},
            )
            position = position + 1
            hidden.append(out.last_hidden_state[:, -1])
    return torch.stack(hidden), state.cache


def test_decoding_steps_write_into_the_reserved_room_and_attend_as_the_growing_cache_does(
    tiny_model, tokenizer
):
    prompts = user_prompts(tokenizer, ("Recommend me a film.", "I watched Heat and Alien; what next?"))
    want, plain = decode_steps(tiny_model, tokenizer, prompts, steps=4, room=None)
    got, roomy = decode_steps(tiny_model, tokenizer, prompts, steps=4, room=4)
    assert_close_at_scale(got, want, name="hidden states")
    assert all(isinstance(layer, _RoomyLayer) for layer in roomy.layers)
    for layer, reference in zip(roomy.layers, plain.layers, strict=True):
        assert layer.keys.shape == reference.keys.shape  # the filled part only, as the model reads it
        assert_close_at_scale(layer.values, reference.values, name="cached values")
        key_buffer, _ = layer._buffers
        assert layer.keys.data_ptr() == key_buffer.data_ptr()  # a view of the buffer: nothing was copied
        assert key_buffer.size(-2) == layer.keys.size(-2)  # all 4 tokens of room used


def test_a_layer_out_of_room_goes_on_by_concatenation(tiny_model, tokenizer):
    prompts = user_prompts(tokenizer, ("Recommend me a film.", "hi"))
    want, plain = decode_steps(tiny_model, tokenizer, prompts, steps=3, room=None)
    got, roomy = decode_steps(tiny_model, tokenizer, prompts, steps=3, room=1)
    assert_close_at_scale(got, want, name="hidden states")
    for layer, reference in zip(roomy.layers, plain.layers, strict=True):
        assert layer._buffers is None  # dropped at the first step that did not fit
        assert_close_at_scale(layer.keys, reference.keys, name="cached keys")


def test_a_batch_selection_of_a_roomy_layer_keeps_the_chosen_rows():
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    cache = DynamicCache(ddp_cache_data=[(keys, values)])
    assert reserve_room(cache, 2) == 1
    new_keys, new_values = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    cache.update(new_keys, new_values, 0)
    cache.layers[0].batch_select_indices(torch.tensor([2, 0]))
    got_keys, got_values = cache.update(torch.zeros(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)
    assert torch.equal(got_keys[:, :, :5], keys[[2, 0]]) and torch.equal(
        got_keys[:, :, 5], new_keys[[2, 0], :, 0]
    )
    assert torch.equal(got_values[:, :, 6], torch.ones(2, 2, 4)) and got_keys.shape == (2, 2, 7, 4)


def test_reserve_room_leaves_layers_that_are_not_plain_dynamic_ones_alone():
    cache = Cache(layers=[DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4), DynamicLayer()])
    for i in range(2):
        cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), i)  # the last layer stays empty
    assert reserve_room(cache, 8) == 1
    assert [type(layer) for layer in cache.layers] == [_RoomyLayer, DynamicSlidingWindowLayer, DynamicLayer]
    assert reserve_room(cache, 0) == 0 and reserve_room(None, 8) == 0
