"""`--lora_top_layers N`: the adapter sits on the last N decoder layers only, and the backward pass stops
at the lowest of them (what makes a step cheaper)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from recipes import recpo
from recipes.modeling import restrict_lora_to_top_layers
from tests.recipes.conftest import build_tiny_model, recpo_args

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_layers(model) -> set[int]:
    return {
        int(name.split(".layers.")[1].split(".")[0])
        for name, _ in model.named_parameters()
        if "lora_" in name
    }


def test_adapter_only_on_the_top_layers_and_backward_stops_below_them(tokenizer):
    model = build_tiny_model(tokenizer)  # 2 layers
    config = restrict_lora_to_top_layers(LoraConfig(r=4, target_modules=MODULES), model, 1)
    assert config.layers_to_transform == [1]
    peft_model = get_peft_model(model, config)
    assert lora_layers(peft_model) == {1}

    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    ids = torch.as_tensor([tokenizer.encode("a user who likes films")])
    hidden = peft_model(input_ids=ids, output_hidden_states=False).logits[0, -1]
    for hook in hooks:
        hook.remove()
    first = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    second = outputs[1][0] if isinstance(outputs[1], tuple) else outputs[1]
    assert not first.requires_grad  # nothing below the adapter is part of the backward graph
    assert second.requires_grad
    hidden.sum().backward()
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_every_layer_when_not_set_and_clear_errors_when_wrong(tokenizer):
    model = build_tiny_model(tokenizer)
    config = LoraConfig(r=4, target_modules=MODULES)
    assert restrict_lora_to_top_layers(config, model, None).layers_to_transform is None
    with pytest.raises(ValueError, match="between 1 and 2"):
        restrict_lora_to_top_layers(LoraConfig(r=4, target_modules=MODULES), model, 3)
    with pytest.raises(ValueError, match="between 1 and 2"):
        restrict_lora_to_top_layers(LoraConfig(r=4, target_modules=MODULES), model, 0)
    with pytest.raises(ValueError, match="use_peft"):
        restrict_lora_to_top_layers(None, model, 1)


def test_run_with_top_layers_saves_an_adapter_on_those_layers(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    recpo.main(*recpo_args(out, tiny_model_dir, synthetic_data, max_steps=1, lora_top_layers=1))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]
    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = weights.keys()  # safe_open is not iterable itself
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in names}
    assert layers == {1}
