"""`item_warmup_average_steps`: the warm-up's trainable weights replaced by their mean over its last steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from recipes import recpo
from recipes import trainer as trainer_module
from recipes.weight_average import WeightAverage, trainable
from tests.numerics import assert_close_at_scale
from tests.recipes.conftest import build_trainer, recpo_args


def trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainable(model)}


def set_trainable(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for _, param in trainable(model):
            param.fill_(value)


def two_layer_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).to(dtype)
    model[0].weight.requires_grad_(False)  # frozen: neither kept nor touched
    return model


def test_the_average_takes_the_weights_place_as_the_mean_of_what_was_added():
    model = two_layer_model()
    frozen = model[0].weight.detach().clone()
    average = WeightAverage()
    for step, value in enumerate([1.0, 2.0, 6.0], start=7):
        set_trainable(model, value)
        average.add(model, step)
    average.copy_to(model)
    assert (average.count, average.first_step, average.last_step) == (3, 7, 9)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, torch.full_like(param, 3.0)), name
    assert torch.equal(model[0].weight, frozen)
    assert sorted(average.total) == ["0.bias", "1.bias", "1.weight"]


def test_a_bf16_weight_gets_the_float32_mean_rounded_once():
    model = two_layer_model(torch.bfloat16)
    average = WeightAverage()
    values = [1.0, 1.0 + 2**-7]  # bf16 neighbours: their float32 mean lies between them
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            model[1].weight.fill_(value)
        average.add(model, step)
    assert average.total["1.weight"].dtype == torch.float32
    average.copy_to(model)
    expected = torch.full_like(model[1].weight, sum(values) / 2, dtype=torch.float32).to(torch.bfloat16)
    assert model[1].weight.dtype == torch.bfloat16 and torch.equal(model[1].weight, expected)


def test_copying_to_a_model_with_other_trainable_weights_says_which():
    average = WeightAverage()
    with pytest.raises(ValueError, match="no weights"):
        average.copy_to(two_layer_model())
    average.add(two_layer_model(), 1)
    other = two_layer_model()
    other[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"0\.weight"):
        average.copy_to(other)


def test_the_trainer_averages_the_warm_ups_last_steps_and_starts_recpo_from_the_mean(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        item_warmup_steps=5,
        max_steps=7,
        item_warmup_average_steps=2,
    )
    trainer.model.train()
    # Before each training step, the weights the previous optimizer step left: step s leaves the value s.
    for step in range(0, 5):
        trainer.state.global_step = step
        set_trainable(trainer.model, float(step))
        trainer.average_warmup_weights()
        trainer.average_warmup_weights()  # the same step's other micro-batches add nothing
        assert not trainer.warmup_average_applied
    assert (
        trainer.warmup_average.count == 1
    )  # step 4 (steps 4 and 5 are the last 2); 0-3 are outside the window
    trainer.state.global_step = 5  # the warm-up is over: this training step is RecPO's first
    set_trainable(trainer.model, 5.0)
    trainer.average_warmup_weights()
    assert trainer.warmup_average_applied and trainer.warmup_average is None  # its copy is let go
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, torch.full_like(param, 4.5)), name
    assert trainer._metrics["train"]["warmup/averaged_steps"] == [2.0]
    trainer.state.global_step = 6
    set_trainable(trainer.model, 6.0)
    trainer.average_warmup_weights()  # once only: RecPO's own steps are left alone
    assert all(torch.equal(p, torch.full_like(p, 6.0)) for p in trainer.model.parameters() if p.requires_grad)


def test_a_warm_up_restart_starts_the_average_afresh_and_a_run_that_stops_in_its_warm_up_takes_the_mean(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        item_warmup_steps=10,
        max_steps=12,
        item_warmup_average_steps=100,  # longer than the warm-up: every step counts
        warmup_restarts=1,
        warmup_restart_check_steps=2,
    )
    trainer.create_optimizer()
    trainer.state.max_steps = 12
    trainer.model.train()
    for step in (1, 2):
        trainer.state.global_step = step
        set_trainable(trainer.model, 100.0)  # the collapsed start's weights
        trainer.average_warmup_weights()
    trainer._batch_spreads.extend([0.01] * 10)
    assert trainer.restart_warmup_if_collapsed()
    assert trainer.warmup_average is None
    for step, value in ((3, 1.0), (4, 3.0)):
        trainer.state.global_step = step
        set_trainable(trainer.model, value)
        trainer.average_warmup_weights()
    trainer.average_warmup_weights(final=True)  # the time budget stopped the run at step 4, in the warm-up
    assert trainer.warmup_average_applied
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in trainer.model.parameters() if p.requires_grad)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_run_saves_the_mean_of_its_warm_up_weights_and_a_resumed_run_saves_the_same(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    added: dict[int, dict[str, torch.Tensor]] = {}
    real_add = WeightAverage.add

    def recording_add(self, model, step):
        added[step] = trainable_copy(model)
        real_add(self, model, step)

    monkeypatch.setattr(trainer_module.WeightAverage, "add", recording_add)
    run = dict(
        item_warmup_steps=4, max_steps=4, item_warmup_average_steps=4, save_strategy="steps", save_steps=2
    )
    out = tmp_path / "run"
    recpo.main(*recpo_args(out, tiny_model_dir, synthetic_data, **run))
    assert sorted(added) == [
        1,
        2,
        3,
        4,
    ]  # step s's weights are added before step s + 1; step 4's after training
    final = adapter_weights(out)
    step_2, step_4 = adapter_weights(out / "checkpoint-2"), adapter_weights(out / "checkpoint-4")
    assert (out / "checkpoint-2" / trainer_module.AVERAGE_FILE).is_file()
    keys = sorted(final)
    assert keys == sorted(step_4) and len(keys) > 0

    def saved_name(
        name: str,
    ) -> str:  # peft saves "...lora_A.weight" for the parameter "...lora_A.default.weight"
        return name.replace(".default.", ".")

    for name, _ in added[2].items():
        mean = sum(added[s][name] for s in (1, 2, 3, 4)) / 4
        key = saved_name(name)
        assert torch.equal(added[2][name], step_2[key]) and torch.equal(added[4][name], step_4[key])
        assert_close_at_scale(final[key], mean, rel=1e-6)
    assert any(not torch.equal(final[k], step_4[k]) for k in keys)  # the mean is not the last step's weights

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    added.clear()
    recpo.main(
        *recpo_args(
            resumed,
            tiny_model_dir,
            synthetic_data,
            resume_from_checkpoint=str(resumed / "checkpoint-2"),
            **run,
        )
    )
    assert sorted(added) == [2, 3, 4]  # step 1's weights came back from the checkpoint
    again = adapter_weights(resumed)
    for key in keys:
        assert_close_at_scale(again[key], final[key], rel=1e-5)
