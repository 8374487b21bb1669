"""recipes/modeling.py: attention settings that must change nothing but memory."""

from __future__ import annotations

import os

import torch

from recipes.modeling import unrepeated_gqa_attention_on_cpu
from tests.recipes.conftest import build_tiny_model


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
    repeated, repeated_grads = run()
    unrepeated_gqa_attention_on_cpu()
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    unrepeated, unrepeated_grads = run()
    torch.testing.assert_close(unrepeated, repeated, atol=1e-6, rtol=1e-5)
    for name, grad in repeated_grads.items():
        torch.testing.assert_close(unrepeated_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_an_explicit_gqa_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    unrepeated_gqa_attention_on_cpu()
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"
