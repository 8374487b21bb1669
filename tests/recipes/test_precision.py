"""The bf16 path on CPU (recipes/precision.py): which dtype `precision` picks, and a bf16 run that keeps
everything that learns or decides in float32 (LoRA weights, optimizer state, log-probs, scores, losses)."""

from __future__ import annotations

import json

import pytest
import torch

from recipes import precision as precision_module
from recipes import recpo
from recipes.precision import cpu_bf16_units, resolve_precision
from tests.recipes.conftest import build_tiny_model, recpo_args
from tests.recipes.test_losses import hand_made_batch, lora_grads, loss_ready_trainer, with_shifted_old_logps


@pytest.mark.parametrize(
    ("units", "on_cpu", "model_dtype", "expected"),
    [
        ("AMX-BF16", True, "float32", "bfloat16"),
        ("AVX512-BF16", True, "float32", "bfloat16"),
        (None, True, "float32", "float32"),
        ("AMX-BF16", False, "float32", "float32"),  # a GPU keeps the model's dtype
        (None, False, "bfloat16", "bfloat16"),  # the paper recipes on a GPU
        ("AMX-BF16", True, "float16", "float16"),  # an explicit model dtype is kept
    ],
)
def test_auto_picks_bf16_only_on_a_cpu_with_bf16_units(monkeypatch, units, on_cpu, model_dtype, expected):
    monkeypatch.setattr(precision_module, "cpu_bf16_units", lambda: units)
    chosen = resolve_precision("auto", model_dtype, on_cpu)
    assert chosen.dtype == expected and chosen.requested == "auto" and chosen.reason


def test_explicit_precisions_are_kept_and_others_refused(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_units", lambda: "AMX-BF16")
    assert resolve_precision("float32", "bfloat16", on_cpu=True).dtype == "float32"
    assert resolve_precision("bfloat16", "float32", on_cpu=False).dtype == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "float32", on_cpu=True)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16"),
        ("fpu avx512f avx512_bf16", "AVX512-BF16"),
        ("fpu avx2", None),
    ],
)
def test_without_torchs_feature_checks_the_cpu_flags_decide(monkeypatch, tmp_path, flags, expected):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(precision_module, "CPUINFO", cpuinfo)
    assert cpu_bf16_units() == expected


def test_a_bf16_run_keeps_what_learns_in_float32_and_records_its_precision(
    tiny_model_dir, synthetic_data, tmp_path
):
    out = tmp_path / "run"
    seen = {}
    original = recpo.RecPOTrainer.training_step

    def step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        seen["loss"] = loss.dtype
        seen["optimizer"] = {s["exp_avg"].dtype for s in self.optimizer.state.values() if "exp_avg" in s}
        seen["index"] = self.item_index.dtype if self.item_index is not None else None
        seen["weights"] = {(p.requires_grad, p.dtype) for p in self.model.parameters()}
        return loss

    recpo.RecPOTrainer.training_step = step
    try:
        args = recpo_args(
            out, tiny_model_dir, synthetic_data, precision="bfloat16", max_steps=2, disable_dropout=True
        )
        recpo.main(*args)
    finally:
        recpo.RecPOTrainer.training_step = original
    assert json.loads((out / "run_config.json").read_text())["precision"]["dtype"] == "bfloat16"
    assert seen.pop("weights") == {(False, torch.bfloat16), (True, torch.float32)}  # frozen base, LoRA
    assert seen == {"loss": torch.float32, "optimizer": {torch.float32}, "index": torch.float32}
    saved = torch.load(out / "item_index.pt", weights_only=True)["vectors"]
    assert saved.dtype == torch.float32


def test_a_bf16_step_gives_the_float32_loss_and_gradient_direction(tokenizer, synthetic_data, tmp_path):
    """One RecPO loss (token + item surrogate) and its LoRA gradients with bf16 base weights against float32 on
    the same (bf16-representable) weights. bf16 keeps 8 significant bits (unit roundoff 2^-9), and the tiny
    model's vectors are crowded (mean cosine ~0.99), so the part of a vector that ranks is ~1/7 of its norm and
    tau = 0.02 multiplies cosine errors by 50: measured here, loss within 1e-4 relative, the gradient's cosine
    with float32's 0.9996 and its norm 9% off (the item term; the token term is within 1.4%). The bounds leave
    that room; a wrong scale or a dropped term moves the loss by far more than 1%."""
    weights16 = build_tiny_model(tokenizer).to(torch.bfloat16)
    weights32 = build_tiny_model(tokenizer)
    weights32.load_state_dict({k: v.float() for k, v in weights16.state_dict().items()})
    trainers = {
        dtype: loss_ready_trainer(tokenizer, synthetic_data, tmp_path / str(dtype), model=model)
        for dtype, model in ((torch.float32, weights32), (torch.bfloat16, weights16))
    }
    lora = {k: v for k, v in trainers[torch.float32].model.state_dict().items() if "lora_" in k}
    trainers[torch.bfloat16].model.load_state_dict(lora, strict=False)
    base = trainers[torch.bfloat16].model.get_base_model().model.layers[0].self_attn.q_proj
    assert (
        base.base_layer.weight.dtype == torch.bfloat16
        and base.lora_A["default"].weight.dtype == torch.float32
    )

    batch = with_shifted_old_logps(trainers[torch.float32], hand_made_batch(trainers[torch.float32]))
    results = {}
    for dtype, trainer in trainers.items():
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        grads = lora_grads(trainer.model)
        results[dtype] = (loss, torch.cat([grads[k].flatten() for k in sorted(grads)]))
    (loss32, grad32), (loss16, grad16) = results[torch.float32], results[torch.bfloat16]
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 0.3


# bf16: rounding of the adapter's products (peft forms them in float32), a few bf16 ulps of the output's scale;
# float32: the same products in another order (the scaling applied to B, the sum fused into its product).
@pytest.mark.parametrize(
    "dtype, output_tolerance, gradient_cosine",
    [(torch.bfloat16, 2e-2, 0.999), (torch.float32, 1e-5, 1 - 1e-6)],
)
def test_lean_lora_keeps_float32_weights_and_matches_peft(
    tokenizer, dtype, output_tolerance, gradient_cosine
):
    from peft import LoraConfig, get_peft_model

    from recipes.precision import lean_lora

    def lora_model():
        model = get_peft_model(
            build_tiny_model(tokenizer).to(dtype),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        )
        return model.train()

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for patched in (False, True):
        torch.manual_seed(1)
        model = lora_model()
        if patched:
            assert lean_lora(model) == 4  # q_proj and down_proj of both layers
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        projection = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
        (hidden.float() * projection).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert {g.dtype for g in grads.values()} == {torch.float32}  # the optimizer's side stays float32
        results.append((hidden.detach().float(), grads))
    (peft_hidden, peft_grads), (ours, our_grads) = results
    assert ((ours - peft_hidden).norm() / peft_hidden.norm()).item() < output_tolerance
    for name, grad in peft_grads.items():
        cosine = torch.nn.functional.cosine_similarity(our_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > gradient_cosine, name
        if dtype == torch.float32:
            assert ((our_grads[name] - grad).norm() / grad.norm()).item() < output_tolerance, name


def test_lean_lora_leaves_merged_and_disabled_adapters_to_peft(tokenizer):
    from peft import LoraConfig, get_peft_model

    from recipes.precision import lean_lora

    model = get_peft_model(
        build_tiny_model(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    ).eval()
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        assert lean_lora(model) == 2
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
        lean = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    scale = adapted.abs().max()
    # the adapter changes the output, so the checks below can fail
    assert (adapted - base).abs().max() > 1e-3 * scale
    assert (lean - adapted).abs().max() < 1e-5 * scale
    assert (merged - adapted).abs().max() < 1e-4 * scale


@pytest.mark.parametrize("config", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora_bias"])
def test_lean_lora_leaves_other_adapter_kinds_to_peft(tokenizer, config):
    from peft import LoraConfig, get_peft_model

    from recipes.precision import lean_lora

    model = get_peft_model(
        build_tiny_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **config)
    )
    assert lean_lora(model) == 0
