"""The real RecPOTrainer in two gloo processes on CPU: the replicas train one model, and where training is
deterministic it is the model one process trains on the same global batch.

One `accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml` runs every mode of `mp_recpo.MODES` (item
warm-up, RecPO with reasoning, the no-reasoning ablation, each with and without gradient accumulation 2) and a time
budget spent on one rank only, with RecPOConfig's default `use_cpu: false` as the recipes have it (DESIGN.md
section 5: such a launch must still form one job, so the world size is asserted). Each process writes its LoRA
weights after every step; the one-process reference runs `mp_recpo.run_mode` here with twice the users per device:
TRL's sampler hands each process a contiguous slice of the global batch, so both see the same users in each step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.numerics import assert_close_at_scale, assert_dicts_close_at_scale
from tests.recipes import mp_recpo
from tests.recipes.test_multiprocess import free_port

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
ALL_MODES = [*mp_recpo.MODES, mp_recpo.BUDGET_MODE, mp_recpo.RESTART_MODE, mp_recpo.WARMUP_BUDGET_MODE]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, synthetic_data) -> Path:
    out = tmp_path_factory.mktemp("two-trainers")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(Path(mp_recpo.__file__)), str(out), str(tiny_model_dir), str(synthetic_data), *ALL_MODES,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # A new session, so that a hang (processes waiting in a collective) can be ended with all its children.
    launch = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = launch.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
        pytest.fail(f"the launch hung (a process waits in a collective the others left):\n{output[-4000:]}")
    assert launch.returncode == 0, output[-6000:]
    return out


def per_rank(launched: Path, mode: str) -> list[dict]:
    return [torch.load(launched / mode / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, synthetic_data):
    """The one-process reference of a mode (computed once): the same global batch, on 4 users per device."""
    done: dict[str, dict] = {}

    def run(mode: str) -> dict:
        if mode not in done:
            out = tmp_path_factory.mktemp(f"one-{mode}")
            done[mode] = mp_recpo.run_mode(
                mode, out, tiny_model_dir, synthetic_data, users_per_device=2 * WORLD, use_cpu=True
            )
        return done[mode]

    return run


def test_the_cpu_2proc_launch_trains_in_two_processes_without_use_cpu(launched):
    for mode in ALL_MODES:
        ranks = per_rank(launched, mode)
        assert [(r["rank"], r["world"], r["processes"]) for r in ranks] == [
            (0, WORLD, WORLD),
            (1, WORLD, WORLD),
        ], mode


@pytest.mark.parametrize("mode", list(mp_recpo.MODES))
def test_both_replicas_hold_the_same_lora_weights_after_every_step(launched, mode):
    rank0, rank1 = per_rank(launched, mode)
    assert rank0["global_step"] == rank1["global_step"] == mp_recpo.COMMON["max_steps"]
    assert sorted(rank0["by_step"]) == sorted(rank1["by_step"]) == [1, 2, 3]
    for step in rank0["by_step"]:
        assert_dicts_close_at_scale(rank1["by_step"][step], rank0["by_step"][step])
    assert_dicts_close_at_scale(rank1["final"], rank0["final"])
    # The weights moved: every LoRA B matrix starts at zero.
    assert all(w.abs().max() > 0 for name, w in rank0["final"].items() if "lora_B" in name)


@pytest.mark.parametrize("mode", sorted(mp_recpo.DETERMINISTIC_STEPS))
def test_two_processes_train_the_model_one_process_trains_on_the_same_global_batch(
    launched, one_process, mode
):
    rank0, _ = per_rank(launched, mode)
    reference = one_process(mode)
    assert reference["world"] == 1
    first, want = rank0["history"][0], reference["history"][0]
    assert first["step"] == want["step"] == 1
    assert first["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert first["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for step in range(1, mp_recpo.DETERMINISTIC_STEPS[mode] + 1):
        for name, weight in reference["by_step"][step].items():
            assert_close_at_scale(rank0["by_step"][step][name], weight, name=f"step {step} {name}")


def test_a_collapsed_warm_up_restarts_on_both_ranks_together_with_the_same_new_factors(launched):
    rank0, rank1 = per_rank(launched, mp_recpo.RESTART_MODE)
    assert (
        rank0["global_step"] == rank1["global_step"] == mp_recpo.COMMON["max_steps"] + 1
    )  # the spent step again
    for rank in (rank0, rank1):
        checks = [e["step"] for e in rank["history"] if "warmup/check_spread" in e]
        assert checks == [2]  # decided once, at the first step after the check
    assert sorted(rank0["by_step"]) == sorted(rank1["by_step"]) == [1, 2, 3, 4]
    for step in rank0["by_step"]:
        assert_dicts_close_at_scale(rank1["by_step"][step], rank0["by_step"][step])
    # After the restart the A factors are new draws: a change far beyond one SGD step's (at most lr x the
    # clipped gradient norm, 0.1, over all weights together).
    a_name = next(n for n in rank0["by_step"][1] if "lora_A" in n)
    redrawn = (rank0["by_step"][2][a_name] - rank0["by_step"][1][a_name]).norm()
    stepped = (rank0["by_step"][3][a_name] - rank0["by_step"][2][a_name]).norm()
    assert stepped <= 0.1 + 1e-6 < 0.5 < redrawn


def test_a_time_budget_spent_on_one_rank_stops_every_rank_at_that_step(launched):
    rank0, rank1 = per_rank(launched, mp_recpo.BUDGET_MODE)
    assert rank0["global_step"] == rank1["global_step"] == 1


def test_a_warmup_budget_spent_on_one_rank_ends_the_warmup_on_every_rank_at_that_step(launched):
    rank0, rank1 = per_rank(launched, mp_recpo.WARMUP_BUDGET_MODE)
    for rank in (rank0, rank1):
        # 1 warm-up step, then the RecPO step
        assert (rank["item_warmup_steps"], rank["global_step"]) == (1, 2)
        assert [entry["step"] for entry in rank["history"] if "timing/generation_s" in entry] == [2]
    for step in (1, 2):
        assert_dicts_close_at_scale(rank1["by_step"][step], rank0["by_step"][step])


@pytest.mark.parametrize("mode", ["no_reasoning", "reasoning"])
def test_evaluation_ranks_every_users_rows_and_traces_them_all(launched, mode):
    rank0, rank1 = per_rank(launched, mode)
    assert rank0["evaluation"] == rank1["evaluation"]  # one figure from every rank's users
    traces = launched / mode / "run" / "traces"
    for split, users in mp_recpo.EVAL_USERS.items():  # `test` has 1 user: rank 1 evaluates none
        lines = (traces / f"{split}_step000003.jsonl").read_text().splitlines()
        assert len(lines) == users, split
