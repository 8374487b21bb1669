"""What several processes need of one process's code (issue 19), checked in one process at each boundary: the
config's refusals and its CPU launch, the trainer's refusal of ZeRO-3/FSDP, the model's placement before a DeepSpeed
evaluation, a closed vLLM rollout's log-probs, TRL's EOS metrics, the no-reasoning loss of any micro-batch, the time
budget agreed by every process, and the gradient average that stands in for DDP's all-reduce.

Nothing here launches a second process: stand-ins play the other processes, the launcher's environment and the
DeepSpeed or vLLM state (the 2-process runs are tests/recipes/test_multiprocess_trainer.py).
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import TrainerControl, TrainerState
from trl import GRPOConfig

from recipes.config import RecPOConfig, launched_processes
from recipes.trainer import TRL_EOS_METRICS, TimeBudgetCallback, average_gradients, true_on_any_process
from tests.recipes.conftest import build_trainer

LAUNCH_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def one_process(monkeypatch):
    """No launcher's process count in the environment (the test run may itself be under one)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def config(tmp_path, **fields) -> RecPOConfig:
    return RecPOConfig(output_dir=str(tmp_path), report_to="none", **{"use_cpu": True, **fields})


# ----------------------------------------------------------------------------- config: num_iterations


def test_reused_batches_with_the_item_loss_are_refused(tmp_path, one_process):
    with pytest.raises(ValueError, match="num_iterations is 2.*item_loss_weight: 0"):
        config(tmp_path, num_iterations=2, reasoning=True, item_loss_weight=1.0)


def test_reused_batches_for_the_token_loss_alone_are_accepted(tmp_path, one_process):
    assert config(tmp_path, num_iterations=2, reasoning=True, item_loss_weight=0.0).num_iterations == 2


# ----------------------------------------------------------------------------- config: launched processes


def test_one_process_when_no_launcher_says_otherwise(one_process):
    assert launched_processes() == 1


@pytest.mark.parametrize("name", LAUNCH_VARIABLES)
def test_launched_processes_reads_the_launchers_variable(monkeypatch, one_process, name):
    monkeypatch.setenv(name, "3")
    assert launched_processes() == 3


def test_launched_processes_ignores_a_value_that_is_no_count(monkeypatch, one_process):
    monkeypatch.setenv("WORLD_SIZE", "")
    monkeypatch.setenv("PMI_SIZE", "two")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launched_processes() == 2


@pytest.fixture
def two_launched_processes(monkeypatch, one_process):
    """A 2-process launch (WORLD_SIZE=2) at the config's boundary: TRL's and transformers' `__post_init__` would form
    the process group (and wait for the other rank), so a stand-in records what RecPO hands it; `world_size` is what
    accelerate would then report (set `seen["world_size"]`)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {"world_size": 2}
    monkeypatch.setattr(GRPOConfig, "__post_init__", lambda self: seen.update(use_cpu=self.use_cpu))
    monkeypatch.setattr(RecPOConfig, "world_size", property(lambda self: seen["world_size"]), raising=False)
    return seen


def test_several_cpu_processes_are_launched_as_one_gloo_job(tmp_path, monkeypatch, two_launched_processes):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    args = config(tmp_path, use_cpu=False)  # the recipes' setting
    assert two_launched_processes["use_cpu"] is True  # what transformers' device setup sees
    assert args.use_cpu is True


def test_processes_with_an_accelerator_keep_it(tmp_path, monkeypatch, two_launched_processes):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    config(tmp_path, use_cpu=False)
    assert two_launched_processes["use_cpu"] is False


def test_processes_that_would_each_train_their_own_model_are_refused(
    tmp_path, monkeypatch, two_launched_processes
):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    two_launched_processes["world_size"] = 1  # accelerate found no distributed backend
    with pytest.raises(ValueError, match="2 processes were launched.*world size 1"):
        config(tmp_path, use_cpu=False)


# ----------------------------------------------------------------------------- trainer: sharded parameters


@pytest.mark.parametrize("sharding", ["zero3", "fsdp"])
def test_zero3_and_fsdp_are_refused(tokenizer, synthetic_data, tmp_path, monkeypatch, sharding):
    import trl.trainer.grpo_trainer as grpo

    class ShardedBackend(grpo.DistributedBackend):  # what TRL reads from accelerate's ZeRO-3 or FSDP plugin
        def __init__(self, accelerator):
            super().__init__(accelerator)
            if sharding == "zero3":
                self.zero_stage = 3
            else:
                self.fsdp_version = 2

    monkeypatch.setattr(grpo, "DistributedBackend", ShardedBackend)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 and FSDP are not supported"):
        build_trainer(tokenizer, synthetic_data, tmp_path / "out", lora=False)


# ----------------------------------------------------------------------------- evaluation: model placement


@pytest.mark.parametrize("deepspeed", [True, False])
def test_a_deepspeed_model_is_placed_on_the_device_before_the_evaluation(
    tokenizer, synthetic_data, tmp_path, deepspeed
):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", lora=False)
    # transformers leaves a DeepSpeed model where it was loaded until train(); the accelerator's device is a
    # stand-in ("meta": the CPU model can move there) for the GPU that DeepSpeed would use.
    trainer.is_deepspeed_enabled = deepspeed
    trainer.accelerator = types.SimpleNamespace(device=torch.device("meta"))
    where = []

    class IndexBuilt(Exception):
        pass

    def index_build():  # the evaluation's first forwards: stop there
        where.append(next(trainer.model.parameters()).device)
        raise IndexBuilt

    trainer.refresh_item_index = index_build
    with pytest.raises(IndexBuilt):
        trainer.ranking_evaluation({"valid": trainer.eval_rows})
    assert where == [torch.device("meta") if deepspeed else torch.device("cpu")]


# ----------------------------------------------------------------------------- vLLM rollouts: log-probs


def test_a_closed_vllm_rollout_drops_the_eos_log_prob_and_appends_none(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    import trl.trainer.grpo_trainer as grpo

    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", lora=False, fast_rollouts=False)
    trainer.model.train()
    marker = trainer.closer.marker_ids
    text = tokenizer.encode("Because I liked it", add_special_tokens=False)
    wrote = tokenizer.encode("Because I liked it <answer>", add_special_tokens=False)
    assert trainer.closer.marker_end(wrote) == len(wrote) - 1 and trainer.closer.marker_end(text) is None
    sampled = [
        text + [tokenizer.eos_token_id],  # ended in EOS without the marker
        text,  # cut by the length limit
        wrote,  # stopped by vLLM at the marker, kept in the output
    ]
    logprobs = [[-0.1 * (j + 1) for j in range(len(ids))] for ids in sampled]  # one per sampled token

    def vllm_generation(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(ids) for ids in sampled], [list(lp) for lp in logprobs]  # TRL's, top-1 log-probs kept

    monkeypatch.setattr(grpo.GRPOTrainer, "_generate_single_turn", vllm_generation)
    closed, closed_logprobs = trainer._generate_single_turn([[1], [1], [1]], None, {}, 1)
    assert closed == [text + marker, text + marker, wrote]
    assert closed_logprobs == [
        logprobs[0][: len(text)] + [None] * len(marker),  # the EOS's log-prob is gone with the EOS
        logprobs[1] + [None] * len(marker),
        logprobs[2],
    ]


# ----------------------------------------------------------------------------- TRL's EOS metrics


def test_trls_eos_metrics_are_not_logged_for_rollouts_closed_by_the_marker(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", lora=False)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    trainer._generate_and_score_completions([dict(row) for row in rows for _ in range(2)])
    logged = trainer._metrics["train"]
    assert "completions/mean_length" in logged  # TRL's own completion metrics ran
    assert logged["completions/marker_written_ratio"]
    assert not set(TRL_EOS_METRICS) & set(logged)


# ----------------------------------------------------------------------------- no-reasoning loss


def test_a_no_reasoning_micro_batch_without_a_marked_row_gives_the_same_loss(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", reasoning=False, random_lora_b=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer._prompt_only_batch([row for row in rows for _ in range(2)])  # G = 2 copies per user
    assert batch["relabel_mask"].tolist() == [True, False, True, False]
    # What TRL's shuffle and split into accumulation pieces can hand one micro-batch: second copies only.
    piece = {key: value[[1, 3]] for key, value in batch.items()}
    assert not piece["relabel_mask"].any()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, piece)
        marked = trainer._compute_loss(
            trainer.model, {**piece, "relabel_mask": torch.ones(2, dtype=torch.bool)}
        )
    assert torch.isfinite(loss) and loss.item() > 0
    assert loss.item() == pytest.approx(marked.item(), rel=1e-6)


# ----------------------------------------------------------------------------- time budget


@pytest.mark.parametrize("flag", [True, False])
def test_true_on_any_process_is_the_flag_in_one_process(flag):
    assert not torch.distributed.is_initialized()
    assert true_on_any_process(flag) is flag


def budget_after(seconds: float, clock: list[float], on_any_process) -> TrainerControl:
    callback = TimeBudgetCallback(minutes=0.5, on_any_process=on_any_process)
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    clock[0] += seconds
    control = TrainerControl()
    callback.on_step_end(None, TrainerState(), control)
    return control


def test_training_stops_when_another_process_has_spent_the_budget(clock):
    asked = []
    control = budget_after(10.0, clock, lambda spent: asked.append(spent) or True)  # another process is spent
    assert asked == [False]  # this process's own clock is not
    assert control.should_training_stop and control.should_save


def test_training_goes_on_while_no_process_has_spent_the_budget(clock):
    asked = []
    control = budget_after(10.0, clock, lambda spent: asked.append(spent) or spent)
    assert asked == [False]
    assert not control.should_training_stop and not control.should_save


def test_this_processs_spent_budget_is_told_to_the_others(clock):
    asked = []
    control = budget_after(30.0, clock, lambda spent: asked.append(spent) or spent)
    assert asked == [True]
    assert control.should_training_stop


# ----------------------------------------------------------------------------- gradient average


def two_dtype_model() -> torch.nn.Module:
    """A float32 and a bfloat16 parameter with gradients, a frozen one and one without a gradient."""
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    model.b = torch.nn.Parameter(torch.tensor([[0.5, 1.5], [-0.25, 4.0]], dtype=torch.bfloat16))
    model.c = torch.nn.Parameter(torch.tensor([7.0]))
    model.frozen = torch.nn.Parameter(torch.tensor([2.0]), requires_grad=False)
    model.a.grad = torch.tensor([0.5, -1.0, 2.0])
    model.b.grad = torch.tensor([[1.0, -0.5], [0.25, 8.0]], dtype=torch.bfloat16)
    model.frozen.grad = torch.tensor([9.0])  # not trainable: never reduced
    return model


@pytest.fixture
def all_reduces(monkeypatch) -> list[torch.Tensor]:
    """Every tensor `torch.distributed.all_reduce` is called with (the real all-reduce still runs)."""
    calls: list[torch.Tensor] = []
    real = torch.distributed.all_reduce
    monkeypatch.setattr(
        torch.distributed, "all_reduce", lambda t, *a, **k: calls.append(t.clone()) or real(t, *a, **k)
    )
    return calls


def test_average_gradients_in_a_one_process_gloo_group_keeps_every_gradient(tmp_path, all_reduces):
    model = two_dtype_model()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        average_gradients(model)
    finally:
        torch.distributed.destroy_process_group()
    for name, p in model.named_parameters():
        if name == "c":
            assert p.grad is None
        else:
            assert p.grad.dtype == before[name].dtype and torch.equal(p.grad, before[name]), name
    # One all-reduce per dtype, each of one dtype's trainable gradients flattened (float32 ones not cast to bf16).
    assert len(all_reduces) == 2
    assert {(t.dtype, t.numel()) for t in all_reduces} == {(torch.float32, 3), (torch.bfloat16, 4)}


def test_average_gradients_divides_the_sum_over_processes_by_their_count(monkeypatch):
    """Two processes at the all-reduce's boundary: the other one's gradients are `other`, summed in by a stand-in."""
    model = two_dtype_model()
    mine = {"a": model.a.grad.clone(), "b": model.b.grad.clone()}
    other = {
        torch.float32: torch.tensor([1.5, 3.0, -4.0]),
        torch.bfloat16: torch.tensor([3.0, 0.5, -0.25, 0.0]),
    }
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(
        torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(other[t.dtype].to(t.dtype))
    )
    average_gradients(model)
    torch.testing.assert_close(model.a.grad, (mine["a"] + other[torch.float32]) / 2)
    expected_b = (mine["b"].float() + other[torch.bfloat16].view(2, 2)) / 2
    torch.testing.assert_close(model.b.grad, expected_b.to(torch.bfloat16))
    assert model.b.grad.dtype == torch.bfloat16
    assert torch.equal(model.frozen.grad, torch.tensor([9.0]))
