"""The paths every paper recipe (recipes/configs/qwen2.5-3b/*, gemma-2-2b/*) takes, run for real on the tiny Llama.

Those recipes evaluate `evals_per_epoch` times per epoch, keep the checkpoint with the best valid NDCG@10
(`load_best_model_at_end`), stop early with patience, and train under gradient checkpointing; the CPU recipe adds a
wall-clock budget. Each is checked here through `recipes.recpo.main` (or the trainer's loss) with the real tokenizer,
a real-architecture model and the synthetic dataset, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, ProgressCallback, TrainerCallback

from recipes import recpo
from recipes import trainer as trainer_module
from recipes.trainer import RecPOTrainer, TimeBudgetCallback, steps_per_epoch
from recipes.vectors import gradient_checkpointing_active
from tests.numerics import assert_close_at_scale, assert_dicts_close_at_scale
from tests.recipes.conftest import build_trainer, recpo_args
from tests.recipes.test_losses import hand_made_batch, lora_grads, loss_ready_trainer, with_shifted_old_logps

METRIC = "valid/ndcg@10"  # what the paper recipes select and stop on (metric_for_best_model)
VALID = [f"valid/{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)]


def run_main(tiny_model_dir, synthetic_data, out: Path, **overrides) -> dict:
    """`recipes.recpo.main` on the tiny model; returns trainer_state.json (written beside results.json)."""
    recpo.main(*recpo_args(out, tiny_model_dir, synthetic_data, **overrides))
    return json.loads((out / "trainer_state.json").read_text())


def evaluation_steps(state: dict) -> list[int]:
    """Steps of the evaluations run during training (the final one logs `final/valid/...` instead)."""
    return [entry["step"] for entry in state["log_history"] if METRIC in entry]


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


@pytest.fixture
def built_trainers(monkeypatch) -> list[RecPOTrainer]:
    """The trainers `recipes.recpo.main` builds, kept for inspection."""
    made: list[RecPOTrainer] = []

    class Recorded(RecPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(recpo, "RecPOTrainer", Recorded)
    return made


# ----------------------------------------------------------------------------- evaluation schedule


@pytest.mark.parametrize(
    "samples, per_device, generations, processes, accumulation, expected",
    [
        (100, 16, 4, 1, 1, 25),  # 4 users per step
        (100, 16, 4, 2, 1, 12),  # 8 users per step: TRL's sampler drops the last 4 users of the epoch
        (100, 16, 4, 2, 3, 4),  # 24 users per step: 4 steps, 4 users left over
        (16, 4, 2, 1, 1, 8),  # the tiny runs below: 2 users per step
        (16, 6, 2, 1, 1, 5),  # 3 users per step, 1 left over
        (3, 16, 4, 1, 1, 1),  # fewer samples than one step takes: the trainer still counts one step
        (10_000, 16, 4, 8, 1, 312),  # a paper recipe (4 users x 4 rollouts) on 8 GPUs: 32 users per step
    ],
)
def test_steps_per_epoch_counts_whole_steps_of_users(
    tmp_path, samples, per_device, generations, processes, accumulation, expected
):
    _, args, _ = recpo_args(
        tmp_path,
        "unused",
        tmp_path,
        per_device_train_batch_size=per_device,
        num_generations=generations,
        gradient_accumulation_steps=accumulation,
    )
    assert steps_per_epoch(samples, args, processes) == expected


@pytest.mark.parametrize(
    "config",
    [
        {"per_device_train_batch_size": 4, "num_generations": 2},
        {"per_device_train_batch_size": 6, "num_generations": 2},
        {"per_device_train_batch_size": 4, "num_generations": 2, "gradient_accumulation_steps": 3},
        {"per_device_train_batch_size": 6, "num_generations": 3, "gradient_accumulation_steps": 2},
        {
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "num_iterations": 2,
            "item_loss_weight": 0.0,
        },
        {"per_device_train_batch_size": 4, "num_generations": 2, "steps_per_generation": 2},
    ],
)
def test_steps_per_epoch_is_the_trainers_own_epoch(tokenizer, synthetic_data, tmp_path, config):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path, max_steps=-1, num_train_epochs=1, **config)
    batches = len(trainer.get_train_dataloader())  # what Trainer.train divides into optimizer steps
    accumulation = trainer.args.gradient_accumulation_steps
    own = -(-batches // accumulation)
    assert steps_per_epoch(len(trainer.train_dataset), trainer.args, 1) == own


@pytest.mark.parametrize(
    "per_device, evals_per_epoch, epochs, expected",
    [
        (4, 4, 1, [2, 4, 6, 8]),  # 16 samples / 2 users: 8 steps an epoch, an evaluation every 2
        (
            6,
            1,
            2,
            [5, 10],
        ),  # 16 samples / 3 users: 5 whole steps an epoch, one evaluation at each epoch's end
    ],
)
def test_evals_per_epoch_sets_when_evaluations_and_checkpoints_happen(
    tiny_model_dir, synthetic_data, tmp_path, per_device, evals_per_epoch, epochs, expected
):
    out = tmp_path / "run"
    state = run_main(
        tiny_model_dir,
        synthetic_data,
        out,
        max_steps=-1,
        num_train_epochs=epochs,
        per_device_train_batch_size=per_device,
        evals_per_epoch=evals_per_epoch,
        eval_strategy="steps",
        save_strategy="steps",
    )
    assert state["global_step"] == expected[-1]
    assert evaluation_steps(state) == expected
    assert checkpoints(out) == expected  # save_steps follows eval_steps
    assert (out / "results.json").is_file()


# ----------------------------------------------------------------------------- best checkpoint


def adapter_digest(model) -> str:
    """Every trainable (LoRA) weight's bytes: which model is being evaluated."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_best_checkpoint_by_valid_ndcg10_is_reloaded_for_the_final_figures(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    # Which evaluation is best is scripted (training-time evaluations score 0.2, 0.9, 0.4, 0.1 on valid NDCG@10),
    # as a function of the weights evaluated: the final evaluation scores whatever weights it finds with the
    # score those weights got during training. Every other figure is the real one.
    scripted = iter([0.2, 0.9, 0.4, 0.1])
    score_of: dict[str, float] = {}
    final_digests: list[str] = []
    original = RecPOTrainer.ranking_evaluation

    def scored(self, splits):
        metrics = original(self, splits)
        digest = adapter_digest(self.model)
        if "test" in splits:  # the final evaluation, after train()
            final_digests.append(digest)
            metrics[METRIC] = score_of.get(digest, float("nan"))
        else:
            assert digest not in score_of, (
                "two evaluations saw the same weights: the scores would be ambiguous"
            )
            score_of[digest] = metrics[METRIC] = next(scripted)
        return metrics

    monkeypatch.setattr(RecPOTrainer, "ranking_evaluation", scored)
    out = tmp_path / "run"
    state = run_main(
        tiny_model_dir,
        synthetic_data,
        out,
        max_steps=8,
        eval_strategy="steps",
        save_strategy="steps",
        evals_per_epoch=4,  # 8 steps an epoch: evaluations (and checkpoints) at steps 2, 4, 6, 8
        load_best_model_at_end=True,
        metric_for_best_model=METRIC,
        learning_rate=1e-2,
    )
    evaluations = {entry["step"]: entry for entry in state["log_history"] if METRIC in entry}
    assert list(evaluations) == [2, 4, 6, 8]
    assert [evaluations[s][METRIC] for s in evaluations] == [0.2, 0.9, 0.4, 0.1]
    # transformers looks the metric up as "eval_" + metric_for_best_model, the key RecPOTrainer.evaluate returns.
    assert state["best_metric"] == 0.9
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-4"

    results = json.loads((out / "results.json").read_text())
    best = evaluations[4]
    assert results["valid"] == {key.split("/")[1]: best[key] for key in VALID}
    assert set(results["test"]) == {key.split("/")[1] for key in VALID}  # the same call, the same model
    assert final_digests == [list(score_of)[1]]  # the final evaluation (valid and test) saw step 4's weights

    saved = load_file(out / "adapter_model.safetensors")
    best_adapter = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    last_adapter = load_file(out / "checkpoint-8" / "adapter_model.safetensors")
    assert saved.keys() == best_adapter.keys()
    assert all(torch.equal(saved[k], best_adapter[k]) for k in saved)
    assert any(not torch.equal(saved[k], last_adapter[k]) for k in saved)  # training moved on after step 4


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_ends_a_run_whose_metric_stops_improving(
    tiny_model_dir, synthetic_data, tmp_path, built_trainers
):
    # learning rate 0: every evaluation gives the same figures, so none improves on the first one.
    state = run_main(
        tiny_model_dir,
        synthetic_data,
        tmp_path / "run",
        max_steps=12,
        eval_strategy="steps",
        eval_steps=1,
        learning_rate=0.0,
        early_stopping_patience=2,
    )
    (trainer,) = built_trainers
    stoppers = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    assert len(stoppers) == 1 and stoppers[0].early_stopping_patience == 2
    assert evaluation_steps(state) == [1, 2, 3]  # the first, then patience evaluations without improvement
    assert len({entry[METRIC] for entry in state["log_history"] if METRIC in entry}) == 1
    assert state["global_step"] == 3


def test_no_early_stopping_without_evaluations(tiny_model_dir, synthetic_data, tmp_path, built_trainers):
    # EarlyStoppingCallback asserts at train begin that evaluations happen: it must not be added at all.
    out = tmp_path / "run"
    state = run_main(
        tiny_model_dir, synthetic_data, out, max_steps=2, eval_strategy="no", early_stopping_patience=8
    )
    (trainer,) = built_trainers
    assert not any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    assert state["global_step"] == 2 and evaluation_steps(state) == []
    assert (out / "results.json").is_file()


# ----------------------------------------------------------------------------- time budget


@pytest.fixture
def ticking_clock(monkeypatch) -> None:
    """A clock that moves one second each time recipes.trainer reads it (at least once a step, in the budget's
    callback), so that a budget of seconds is spent within a known number of steps on any machine."""
    ticks = iter(range(10**6))
    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    clock["perf_counter"] = lambda: float(next(ticks))
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(**clock))


def test_time_budget_stops_a_long_run_saves_and_still_evaluates(
    tiny_model_dir, synthetic_data, tmp_path, ticking_clock, built_trainers
):
    # A 3-second budget is spent within three steps, whatever the machine's speed.
    out = tmp_path / "run"
    state = run_main(
        tiny_model_dir, synthetic_data, out, max_steps=50, time_budget_minutes=0.05, save_strategy="no"
    )
    (trainer,) = built_trainers
    assert any(isinstance(c, TimeBudgetCallback) for c in trainer.callback_handler.callbacks)
    steps = state["global_step"]
    assert 1 <= steps <= 3
    assert checkpoints(out) == [steps]  # the callback asked for a save at the step it stopped
    results = json.loads((out / "results.json").read_text())
    assert set(results["valid"]) == {key.split("/")[1] for key in VALID} and "test" in results
    (final,) = [entry for entry in state["log_history"] if "final/valid/ndcg@10" in entry]
    # The run's peak memory is logged again after the final evaluation, which the step logs cannot see.
    earlier = [
        e["memory/peak_rss_mb"] for e in state["log_history"] if e is not final and "memory/peak_rss_mb" in e
    ]
    assert final["memory/peak_rss_mb"] > 0 and all(final["memory/peak_rss_mb"] >= p for p in earlier)
    assert (out / "adapter_model.safetensors").is_file()


def test_the_progress_bar_of_a_budgeted_run_ends_at_the_step_where_the_budget_stops_it(
    tiny_model_dir, synthetic_data, tmp_path, ticking_clock, monkeypatch
):
    # max_steps 50 and a 3-second budget: tqdm would count its time left over 50 steps; the bar ends where the
    # run stops instead.
    bars: list[tuple[int, int]] = []

    class BarSpy(TrainerCallback):
        """Added after the progress bar's callback: reads the bar once it has counted each step."""

        def __init__(self, trainer: RecPOTrainer) -> None:
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            callbacks = self.trainer.callback_handler.callbacks
            (progress,) = [c for c in callbacks if isinstance(c, ProgressCallback)]
            bars.append((progress.training_bar.n, progress.training_bar.total))

    class Spied(RecPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(BarSpy(self))

    monkeypatch.setattr(recpo, "RecPOTrainer", Spied)
    state = run_main(
        tiny_model_dir,
        synthetic_data,
        tmp_path / "run",
        max_steps=50,
        time_budget_minutes=0.05,
        save_strategy="no",
        disable_tqdm=False,
    )
    steps = state["global_step"]
    assert 1 <= steps <= 3 and len(bars) == steps
    assert bars[-1] == (steps, steps)  # the bar ends full, where the budget stopped the run
    assert all(total <= 3 for _, total in bars)


def test_time_budget_ends_the_warmup_early_and_keeps_the_recpo_steps(
    tiny_model_dir, synthetic_data, tmp_path, ticking_clock, built_trainers, caplog
):
    # A warm-up step reads the clock once (the callback), so 30 s of budget with half kept for RecPO ends the
    # 24-step warm-up near step 15, and the two RecPO steps still run.
    out = tmp_path / "run"
    state = run_main(
        tiny_model_dir,
        synthetic_data,
        out,
        item_warmup_steps=24,
        max_steps=26,
        time_budget_minutes=0.5,
        time_budget_recpo_share=0.5,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
    )
    (ended,) = [
        entry["warmup/ended_early_at"] for entry in state["log_history"] if "warmup/ended_early_at" in entry
    ]
    assert 10 <= ended < 24
    assert state["global_step"] == ended + 2  # the warm-up's early end kept both RecPO steps
    # The warning says what budget the 24 warm-up steps would need (its arithmetic: test_time_budget.py).
    assert re.search(r"At this pace the whole warm-up needs --time_budget_minutes \d+\.", caplog.text)
    recpo_steps = [entry for entry in state["log_history"] if "timing/generation_s" in entry]
    assert [entry["step"] for entry in recpo_steps] == [ended + 1, ended + 2]  # steps with reasoning
    changed = json.loads((out / "run_config.json").read_text())["training"]["changed"]
    assert (changed["item_warmup_steps"]["value"], changed["max_steps"]["value"]) == (ended, ended + 2)
    # A resumed run takes the shortened warm-up back from the checkpoint.
    (checkpoint,) = out.glob("checkpoint-*")
    record = json.loads((checkpoint / trainer_module.RESTARTS_FILE).read_text())
    assert record["restarts"] == 0 and record["extra_steps"] == ended - 24
    assert f"The item warm-up ended early, at step {int(ended)}," in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- gradient checkpointing


def checkpointed(trainer):
    """Turn on gradient checkpointing as Trainer.train does when `gradient_checkpointing: true`."""
    assert trainer.args.gradient_checkpointing
    model = trainer.model
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    kwargs = getattr(trainer.args, "activation_checkpointing_kwargs", None)
    kwargs = kwargs if kwargs is not None else trainer.args.gradient_checkpointing_kwargs
    try:
        enable(activation_checkpointing_kwargs=kwargs)
    except TypeError:  # transformers 4's name
        enable(gradient_checkpointing_kwargs=kwargs)
    assert gradient_checkpointing_active(model)
    return trainer


class ForwardLog:
    """Shapes of the final norm's outputs (what the forwards ran), and calls of layer 0's first norm: it runs inside
    the checkpointed forward (transformers checkpoints `forward`, so hooks on the layer itself never see a recompute;
    torch stops a recompute once it has the saved tensors, so a hook that fires first is the one that counts)."""

    def __init__(self, trainer) -> None:
        base = trainer.model.get_base_model().model
        self.shapes: list[tuple[int, int]] = []
        self.layer_calls = 0
        self.handles = [
            base.norm.register_forward_hook(lambda _m, _i, out: self.shapes.append(tuple(out.shape[:2]))),
            base.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: self._count()),
        ]

    def _count(self) -> None:
        self.layer_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def loss_and_grads(trainer, batch) -> tuple[torch.Tensor, dict, ForwardLog, int]:
    """_compute_loss and its LoRA gradients; the forwards it ran; layer 0's norm calls during the backward."""
    trainer.model.zero_grad()
    log = ForwardLog(trainer)
    loss = trainer._compute_loss(trainer.model, batch)
    before = log.layer_calls
    loss.backward()
    recomputed = log.layer_calls - before
    log.remove()
    return loss.detach(), lora_grads(trainer.model), log, recomputed


def test_checkpointed_loss_falls_back_to_trls_forward_with_the_same_loss_and_gradients(
    tokenizer, synthetic_data, tmp_path, caplog
):
    shared = loss_ready_trainer(tokenizer, synthetic_data, tmp_path / "shared")
    batch = with_shifted_old_logps(shared, hand_made_batch(shared))
    want_loss, want_grads, shared_log, shared_recomputed = loss_and_grads(shared, batch)

    fallback = checkpointed(
        loss_ready_trainer(tokenizer, synthetic_data, tmp_path / "checkpointed", gradient_checkpointing=True)
    )
    with caplog.at_level(logging.INFO, logger="recipes.trainer"):
        got_loss, got_grads, fallback_log, recomputed = loss_and_grads(fallback, batch)

    assert "gradient checkpointing drops the key/value cache" in caplog.text
    whole = tuple(torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1).shape)  # (4, P + C)
    assert whole in fallback_log.shapes  # every rollout's whole sequence went through the model at once
    assert whole not in shared_log.shapes
    assert recomputed > 0 and shared_recomputed == 0  # the checkpointed layers really recomputed
    assert_close_at_scale(got_loss, want_loss, name="loss")
    assert_dicts_close_at_scale(got_grads, want_grads)
    assert fallback._metrics["train"]["item_loss"][-1] == pytest.approx(
        shared._metrics["train"]["item_loss"][-1], rel=1e-4, abs=1e-6
    )


def test_checkpointed_no_reasoning_loss_runs_prompts_whole_with_the_same_gradients(
    tokenizer, synthetic_data, tmp_path
):
    results = {}
    for checkpointing in (False, True):
        trainer = loss_ready_trainer(
            tokenizer,
            synthetic_data,
            tmp_path / str(checkpointing),
            reasoning=False,
            gradient_checkpointing=checkpointing,
        )
        if checkpointing:
            checkpointed(trainer)
        rows = [trainer.train_dataset[i] for i in range(4)]
        batch = trainer._prompt_only_batch([row for row in rows for _ in range(2)])
        results[checkpointing] = (*loss_and_grads(trainer, batch), batch)
    want_loss, want_grads, plain_log, _, batch = results[False]
    got_loss, got_grads, checkpointed_log, recomputed, _ = results[True]

    prompts = batch["prompt_ids"][batch["relabel_mask"]]  # the 4 distinct prompts, left-padded to the longest
    widest = int(batch["prompt_mask"].sum(dim=1).max())
    assert prompts.size(1) == widest
    # Prefill shares the instruction (one row of it, then the suffixes) unless checkpointing drops the cache.
    assert any(rows == 1 for rows, _ in plain_log.shapes) and (4, widest) not in plain_log.shapes
    assert (4, widest) in checkpointed_log.shapes
    assert recomputed > 0
    assert_close_at_scale(got_loss, want_loss, name="loss")
    assert_dicts_close_at_scale(got_grads, want_grads)


def test_the_evaluated_users_are_drawn_by_eval_users_seed_whatever_the_training_seed(
    tokenizer, synthetic_data, tmp_path
):
    """Runs of several training seeds must score the same users as each other and as `make baselines` (seed 42),
    or their figures cannot be paired; without users_seed the subset follows the training seed."""
    from recipes.evaluation import sample_indices

    def users(seed, users_seed):
        t = build_trainer(
            tokenizer, synthetic_data, tmp_path / f"s{seed}-{users_seed}", seed=seed, users_seed=users_seed
        )
        return [r["sample_index"] for r in t.eval_rows], [r["sample_index"] for r in t.test_rows]

    valid_rows, test_rows = len(load_split(synthetic_data, "valid")), len(load_split(synthetic_data, "test"))
    want = (sample_indices(valid_rows, 4, 42), sample_indices(test_rows, 4, 42))
    assert users(7, 42) == users(42, 42) == want
    assert users(7, None) != users(42, None)  # the training seed alone would draw other users
    assert recpo_args(tmp_path / "defaults", "unused", synthetic_data)[0].eval_users_seed == 42


def load_split(data_dir, split):
    from datasets import load_from_disk

    return load_from_disk(str(data_dir))[split]
