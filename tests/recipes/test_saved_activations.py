"""recipes/saved_activations.py: the same forward as transformers, gradients as accurate, fewer bytes kept."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from recipes.saved_activations import keep_fewer_activations


def tiny(kind: str = "llama", act: str = "silu", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act=act,
    )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    return LlamaForCausalLM(LlamaConfig(**shape))


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))


def forward_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final hidden state and every parameter's gradient of a fixed projection of it (norm weights included)."""
    model.zero_grad()
    hidden = model.model(input_ids=ids()).last_hidden_state
    projection = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    (hidden.float() * projection).sum().backward()
    return hidden.detach(), {
        n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_switches_every_norm_and_mlp_of_the_known_families(kind):
    model = tiny(kind)
    assert keep_fewer_activations(model) == 2 * 3 + 1  # per layer two norms and the MLP; the final norm


def test_an_mlp_with_another_activation_keeps_its_own_forward():
    model = tiny(act="gelu")
    assert keep_fewer_activations(model) == 2 * 2 + 1  # the norms only
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_bit_for_bit_the_same(dtype):
    plain = tiny().to(dtype)
    lean = tiny().to(dtype)
    keep_fewer_activations(lean)
    with torch.no_grad():
        assert torch.equal(
            lean.model(input_ids=ids()).last_hidden_state, plain.model(input_ids=ids()).last_hidden_state
        )
    assert torch.equal(forward_and_grads(lean)[0], forward_and_grads(plain)[0])  # with gradient flowing too


def test_gradients_match_autograd_in_float32():
    _, plain = forward_and_grads(tiny())
    lean_model = tiny()
    keep_fewer_activations(lean_model)
    _, lean = forward_and_grads(lean_model)
    assert plain.keys() == lean.keys()
    assert any("norm" in name for name in plain)  # the norms' own weights are checked too
    for name, grad in plain.items():
        assert relative(lean[name], grad) < 1e-5, name


def test_bf16_gradients_are_as_close_to_float32_as_autograds_own():
    """bf16 rounds the backward's intermediates in another order than autograd does, so the two bf16 gradients
    differ by bf16 rounding; measured against float32, the hand-written backward must not be the worse one."""
    _, exact = forward_and_grads(tiny())
    _, plain = forward_and_grads(tiny().to(torch.bfloat16))
    lean_model = tiny().to(torch.bfloat16)
    keep_fewer_activations(lean_model)
    _, lean = forward_and_grads(lean_model)

    def error(grads):
        total = sum(((grads[n] - g) ** 2).sum() for n, g in exact.items())
        return (total / sum((g**2).sum() for g in exact.values())).sqrt().item()

    assert error(plain) > 0  # bf16 really rounds here: the comparison below is not between equal things
    assert error(lean) <= 1.25 * error(plain)


def saved_bytes(model: torch.nn.Module) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model.model(input_ids=ids()).last_hidden_state
    hidden.float().sum().backward()
    return sum(storages.values())


def test_bf16_keeps_fewer_bytes_for_the_backward():
    """Norm weights frozen, as under LoRA: each norm keeps its bf16 input instead of a float32 copy (2 bytes
    less per value), and each MLP no longer keeps silu(gate) (2 bytes per value)."""
    models = []
    for lean in (False, True):
        model = tiny().to(torch.bfloat16)
        for name, param in model.named_parameters():
            param.requires_grad_("norm" not in name)
        if lean:
            keep_fewer_activations(model)
        models.append(model)
    tokens, hidden, inner, layers = 3 * 11, 48, 96, 2
    expected = tokens * (2 * (2 * layers + 1) * hidden + 2 * layers * inner)
    saved = saved_bytes(models[0]) - saved_bytes(models[1])
    assert 0.95 * expected <= saved <= 1.05 * expected


def test_no_gradient_takes_the_plain_path():
    model = tiny()
    keep_fewer_activations(model)
    with torch.no_grad():
        out = model.model.layers[0].mlp(torch.randn(2, 5, 48))
    assert out.grad_fn is None and out.shape == (2, 5, 48)
