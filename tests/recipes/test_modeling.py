"""recipes/modeling.py: attention settings that must change nothing but memory."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import AttentionInterface

from recipes.modeling import float32_attention_where_faster_on_cpu, unrepeated_gqa_attention_on_cpu
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


def _transformers_sdpa():
    current = AttentionInterface._global_mapping["sdpa"]
    return getattr(current, "original", current)


def _float32_by_casting(original):
    """The plain route: cast to float32 around transformers' attention and let autograd keep what it wants."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not torch.is_grad_enabled():
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        output, weights = original(
            module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs
        )
        return output.to(query.dtype), weights

    return attention


def _counting_saved_bytes(attention, counter: list[int]):
    """Wrap an attention function so that what autograd keeps for its backward is added to `counter`."""

    def counted(*args, **kwargs):
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = attention(*args, **kwargs)
        counter[0] += sum(storages.values())
        return result

    return counted


@pytest.fixture
def bf16_model(tokenizer, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", _transformers_own())  # restored after
    unrepeated_gqa_attention_on_cpu()  # as recpo.py installs it
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", _transformers_sdpa())  # restored after
    return build_tiny_model(tokenizer).to(torch.bfloat16).train()


def test_float32_attention_keeps_only_bf16_inputs_and_gives_the_cast_gradients(bf16_model):
    model = bf16_model
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding: the masked attention path

    def run(attention) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        saved = [0]
        AttentionInterface.register("sdpa", _counting_saved_bytes(attention, saved))
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float().square().mean().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach().float(), grads, saved[0]

    original = _transformers_sdpa()
    cast_logits, cast_grads, cast_saved = run(_float32_by_casting(original))
    AttentionInterface.register("sdpa", original)
    float32_attention_where_faster_on_cpu()
    installed = AttentionInterface._global_mapping["sdpa"]
    assert installed.original is original
    logits, grads, saved = run(installed)

    assert_close_at_scale(logits, cast_logits)
    assert set(grads) == set(cast_grads) and len(grads) > 10
    assert_dicts_close_at_scale(grads, cast_grads)  # the recomputed forward's gradients are the cast route's
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    layers, tokens = config.num_hidden_layers, ids.numel()
    bf16_inputs = layers * tokens * head * (config.num_attention_heads + 2 * config.num_key_value_heads) * 2
    float32_output = layers * tokens * head * config.num_attention_heads * 4
    mask_bytes = 3 * 40 * 40 * 4  # one mask, shared by the layers
    assert saved <= bf16_inputs + mask_bytes  # the bf16 query, key and value, nothing in float32
    assert cast_saved >= 2 * bf16_inputs + float32_output  # float32 copies of them and the float32 output


def test_float32_attention_gradients_for_some_inputs_and_an_additive_mask(bf16_model):
    attention_module = bf16_model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 7, 16, generator=generator).bfloat16().requires_grad_()
    key = torch.randn(2, 2, 7, 16, generator=generator).bfloat16()  # a constant: no gradient wanted
    value = torch.randn(2, 2, 7, 16, generator=generator).bfloat16().requires_grad_()
    allowed = torch.ones(7, 7).tril().bool().expand(2, 1, 7, 7).clone()
    allowed[0, :, :, :3] = False
    allowed[0, :, :3, 0] = True  # no row left empty
    mask = torch.zeros(2, 1, 7, 7, dtype=torch.bfloat16).masked_fill(
        ~allowed, torch.finfo(torch.bfloat16).min
    )
    upstream = torch.randn(2, 7, 4, 16, generator=generator)

    def gradients(attention):
        query.grad = value.grad = None
        output, _ = attention(attention_module, query, key, value, mask, dropout=0.0, scaling=0.25)
        output.float().backward(upstream)
        return output.detach().float(), query.grad.float(), value.grad.float()

    want = gradients(_float32_by_casting(_transformers_sdpa()))
    float32_attention_where_faster_on_cpu()
    got = gradients(AttentionInterface._global_mapping["sdpa"])
    assert key.grad is None
    for name, g, w in zip(("output", "query grad", "value grad"), got, want, strict=True):
        assert_close_at_scale(g, w, name=name)


def test_float32_attention_with_dropout_is_not_recomputed(bf16_model):
    attention_module = bf16_model.model.layers[0].self_attn
    query = torch.randn(1, 4, 5, 16).bfloat16().requires_grad_()
    key, value = torch.randn(1, 2, 5, 16).bfloat16(), torch.randn(1, 2, 5, 16).bfloat16()
    float32_attention_where_faster_on_cpu()
    attention = AttentionInterface._global_mapping["sdpa"]
    kept, _ = attention(attention_module, query, key, value, None, dropout=0.0)
    dropped, _ = attention(attention_module, query, key, value, None, dropout=0.5)
    assert "Recomputed" in type(kept.grad_fn).__name__
    assert "Recomputed" not in type(dropped.grad_fn).__name__  # another draw in the backward would be wrong


def _recording(original, calls: list):
    """transformers' attention, noting the dtype and query length of every call it receives."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((query.dtype, query.size(-2)))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


@pytest.mark.parametrize(
    ("units", "decode_dtype"), [("AVX512-BF16", torch.float32), ("AMX-BF16", torch.bfloat16)]
)
def test_decoding_steps_run_attention_in_float32_on_cpus_without_amx(
    bf16_model, monkeypatch, units, decode_dtype
):
    monkeypatch.setattr("recipes.precision.cpu_bf16_units", lambda: units)
    calls: list = []
    AttentionInterface.register("sdpa", _recording(_transformers_sdpa(), calls))
    float32_attention_where_faster_on_cpu()
    model = bf16_model.eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask[:, :9], use_cache=True)
        prompt_calls, calls[:] = list(calls), []
        step = model(input_ids=ids[:, -1:], attention_mask=mask, cache=out.past_key_values)
    layers = model.config.num_hidden_layers
    assert prompt_calls == [(torch.bfloat16, 9)] * layers  # prompts keep bf16 everywhere
    assert calls == [(decode_dtype, 1)] * layers
    assert step.logits.dtype == torch.bfloat16


def test_float32_decoding_attention_matches_a_float64_reference(bf16_model, monkeypatch):
    monkeypatch.setattr("recipes.precision.cpu_bf16_units", lambda: "AVX512-BF16")
    attention_module = bf16_model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(3, 4, 1, 16, generator=generator).bfloat16()
    key = torch.randn(3, 2, 12, 16, generator=generator).bfloat16()
    value = torch.randn(3, 2, 12, 16, generator=generator).bfloat16()
    mask = torch.zeros(3, 1, 1, 12, dtype=torch.bfloat16)
    mask[0, ..., :5] = torch.finfo(torch.bfloat16).min  # a left-padded row
    original = _transformers_sdpa()
    want, _ = original(
        attention_module,
        query.double(),
        key.double(),
        value.double(),
        mask.double(),
        dropout=0.0,
        scaling=0.25,
    )
    float32_attention_where_faster_on_cpu()
    with torch.no_grad():
        got, _ = AttentionInterface._global_mapping["sdpa"](
            attention_module, query, key, value, mask, dropout=0.0, scaling=0.25
        )
    assert got.dtype == torch.bfloat16
    # float32 arithmetic, then one rounding to bf16 (8 significant bits): within 2^-8 of the output's scale
    assert_close_at_scale(got, want, rel=2**-8)
