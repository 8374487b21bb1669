"""Launched by test_multiprocess_trainer.py under `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml`:
the real RecPOTrainer (the tiny Llama saved to a folder, the SmolLM2 tokenizer, the synthetic dataset) trained a few
steps in each mode of MODES, one after the other in the same processes (start-up is paid once).

    mp_recpo.py OUT MODEL_DIR DATA_DIR [MODE ...]

Writes `<OUT>/<mode>/rank<r>.pt` after each mode: the world size the process trained in, its trainable (LoRA)
weights after every optimizer step and at the end, the logged training history and the final step. The config keeps
RecPOConfig's `use_cpu: false`, as the recipes do: on a machine without a GPU the processes must still form one job.
The test runs the same `run_mode` in one process, with twice the users per device, as the reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes import trainer as trainer_module  # noqa: E402
from recipes.modeling import load_model, load_tokenizer  # noqa: E402
from recipes.trainer import TimeBudgetCallback  # noqa: E402
from tests.recipes.conftest import build_trainer  # noqa: E402

# 2 users x 2 rollouts per device and step. Plain SGD, so that a step's update is proportional to the averaged
# gradient: Adam's first step divides each element by its own magnitude, and moves an element whose gradient is
# rounding noise by the full learning rate, one way on one process and the other way on two. lr 0.1 (after clipping
# at norm 1) moves every LoRA weight visibly in 3 steps. `accumulated` modes sum 2 micro-batches per step: with
# steps_per_generation 1 each micro-batch is the next slice of the sampler's order, on one process as on two (the
# default, steps_per_generation = accumulation, shuffles each process's generation batch before splitting it, which
# no one-process run reproduces: those modes are compared across ranks only).
COMMON = {
    "max_steps": 3,
    "optim": "sgd",
    "learning_rate": 0.1,
    "per_device_train_batch_size": 4,
    "num_generations": 2,
}
MODES = {
    "no_reasoning": {"reasoning": False},
    "no_reasoning_accumulated": {
        "reasoning": False,
        "gradient_accumulation_steps": 2,
        "steps_per_generation": 1,
    },
    "warmup": {"item_warmup_steps": 2},
    "warmup_accumulated": {"item_warmup_steps": 2, "gradient_accumulation_steps": 2},
    "reasoning": {},
    "reasoning_accumulated": {"gradient_accumulation_steps": 2},
}
# Deterministic from the same weights and data order: a one-process run on the same global batch must agree.
# (`warmup`: its two item warm-up steps; the RecPO step after them samples rollouts.)
DETERMINISTIC_STEPS = {"no_reasoning": 3, "no_reasoning_accumulated": 3, "warmup": 2}
# Each mode evaluates at the end: 3 users split 2 + 1 over the ranks, and 1 user, which leaves rank 1 none.
EVAL_USERS = {"valid": 3, "test": 1}
# Rank 1's budget runs out at its first step, rank 0's never: the processes must still stop together.
BUDGET_MODE = "time_budget"
# A warm-up that "collapses" (the threshold forced up) after 1 step: both ranks restart it together, with the
# same new LoRA factors, and run the spent step again (4 steps).
RESTART_MODE = "warmup_restart"
RESTART = {"item_warmup_steps": 3, "warmup_restarts": 1, "warmup_restart_check_steps": 1}
# A 3-step warm-up before 1 RecPO step, under a budget that keeps a share for RecPO: rank 1's warm-up share is
# spent at its first step, rank 0's never; both must end the warm-up there and run the RecPO step (2 steps).
WARMUP_BUDGET_MODE = "warmup_budget"
WARMUP_BUDGET = {"item_warmup_steps": 3, "max_steps": 4, "reasoning": True}


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


class Snapshots(TrainerCallback):
    """The trainable weights after every optimizer step, by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = trainable(model)


def run_mode(
    mode: str, out: Path, model_dir: Path, data_dir: Path, users_per_device: int = 2, **extra
) -> dict:
    """Train `mode` for its steps and return what the test compares (see the module docstring)."""
    overrides = {**COMMON, **MODES.get(mode, {"reasoning": False}), **extra}
    if mode == RESTART_MODE:
        overrides.update(RESTART)
    if mode == WARMUP_BUDGET_MODE:
        overrides.update(WARMUP_BUDGET)
    overrides["per_device_train_batch_size"] = users_per_device * overrides["num_generations"]
    set_seed(42)  # as recipes/recpo.py does first: the LoRA initialisation draws from it
    tokenizer = load_tokenizer(str(model_dir))
    trainer = build_trainer(
        tokenizer, data_dir, out / mode / "run", model=load_model(str(model_dir)), **overrides
    )
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    if mode == BUDGET_MODE:
        trainer.add_callback(TimeBudgetCallback(0.0 if trainer.accelerator.process_index == 1 else 1e6))
    if mode == WARMUP_BUDGET_MODE:
        # rank 1 keeps all but 6e-5 s of a huge budget for RecPO, rank 0 half of it
        share = 1 - 1e-12 if trainer.accelerator.process_index == 1 else 0.5
        trainer.add_callback(TimeBudgetCallback(1e6, recpo_share=share, end_warmup=trainer.end_item_warmup))
    threshold = trainer_module.COLLAPSED_SPREAD
    if mode == RESTART_MODE:
        trainer_module.COLLAPSED_SPREAD = 1e9
    try:
        trainer.train()
    finally:
        trainer_module.COLLAPSED_SPREAD = threshold
    evaluation = None
    if mode not in (BUDGET_MODE, WARMUP_BUDGET_MODE):
        rows = {split: trainer.eval_rows[:count] for split, count in EVAL_USERS.items()}
        evaluation = trainer.ranking_evaluation(rows)
    result = {
        "world": trainer.args.world_size,
        "processes": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "final": trainable(trainer.model),
        "by_step": snapshots.by_step,
        "history": [e for e in trainer.state.log_history if "loss" in e],
        "global_step": trainer.state.global_step,
        "item_warmup_steps": trainer.args.item_warmup_steps,
        "evaluation": evaluation,
    }
    trainer.accelerator.wait_for_everyone()
    return result


def main(out: Path, model_dir: Path, data_dir: Path, modes: list[str]) -> None:
    launched_rank = int(os.environ.get("RANK", 0))  # the launcher's: a process that trains alone says 0
    for mode in modes:
        result = run_mode(mode, out, model_dir, data_dir, use_cpu=False)  # the recipes' setting
        torch.save(result, out / mode / f"rank{launched_rank}.pt")


if __name__ == "__main__":
    out, model_dir, data_dir, *modes = sys.argv[1:]
    every = [*MODES, BUDGET_MODE, RESTART_MODE, WARMUP_BUDGET_MODE]
    main(Path(out), Path(model_dir), Path(data_dir), modes or every)
