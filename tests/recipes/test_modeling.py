"""recipes/modeling.py: attention settings that must change nothing but memory."""

from __future__ import annotations

import torch
from transformers.integrations import sdpa_attention

from recipes.modeling import unrepeated_gqa_attention_on_cpu
from tests.numerics import assert_close_at_scale, assert_dicts_close_at_scale
from tests.recipes.conftest import build_tiny_model


def _transformers_own():
    current = sdpa_attention.use_gqa_in_sdpa
    return getattr(current, "original", current)


def test_unrepeated_gqa_attention_gives_the_same_values_and_gradients(tokenizer, monkeypatch):
    model = build_tiny_model(tokenizer).train()  # 4 query heads share 2 key/value heads
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the masked attention path

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    transformers_own = _transformers_own()  # an earlier test may have installed the wrapper in this process
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", transformers_own)  # restored after
    key = torch.zeros(3, 2, 11, 8)
    assert not sdpa_attention.use_gqa_in_sdpa(mask, key, key)  # transformers repeats the heads here
    repeated, repeated_grads = run()
    unrepeated_gqa_attention_on_cpu()
    assert sdpa_attention.use_gqa_in_sdpa(mask, key, key)  # unrepeated, with gradient
    with torch.no_grad():
        assert sdpa_attention.use_gqa_in_sdpa(mask, key, key)  # and without (inference)
        assert_close_at_scale(model(input_ids=ids, attention_mask=mask).logits, repeated)
    unrepeated, unrepeated_grads = run()
    assert_close_at_scale(unrepeated, repeated)
    assert_dicts_close_at_scale(unrepeated_grads, repeated_grads)


def test_an_explicit_gqa_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", _transformers_own())
    before = sdpa_attention.use_gqa_in_sdpa
    unrepeated_gqa_attention_on_cpu()
    assert sdpa_attention.use_gqa_in_sdpa is before
