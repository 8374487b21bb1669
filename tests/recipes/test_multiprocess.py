"""Two processes on CPU (accelerate, gloo): the item loss with negatives gathered across processes equals
the item loss of one process on the same global batch, in value and in gradient.

DESIGN.md section 5: `accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU runs two
gloo processes on CPU (a MULTI_CPU config would silently start one), so the world size is asserted.
The launched script, `mp_item_loss.py`, writes each process's loss and gradients; the reference is
computed here, in one process, with the same `RecPOTrainer._item_loss`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.numerics import assert_close_at_scale
from tests.recipes.mp_batch import SCENARIOS, global_batch
from tests.recipes.mp_item_loss import stand_in_trainer

HERE = Path(__file__).resolve().parent
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def per_process(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two-processes")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "mp_item_loss.py"), str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def one_process(scenario: str) -> dict:
    """The reference: the whole global batch in one process."""
    batch = global_batch(scenario)
    users = batch["users"].clone().requires_grad_(True)
    table = batch["items"].clone().requires_grad_(True)
    trainer = stand_in_trainer(SimpleNamespace(num_processes=1, process_index=0), table, batch["tau"])
    from recipes.trainer import RecPOTrainer

    loss = RecPOTrainer._item_loss(trainer, None, users, batch["targets"], batch["advantages"], batch["mask"])
    loss.backward()
    return {"loss": loss.detach(), "users_grad": users.grad, "items_grad": table.grad}


def test_two_gloo_processes_were_started(per_process):
    assert [r["world"] for r in per_process] == [WORLD, WORLD]


def test_gathered_negatives_give_the_single_process_item_loss(per_process):
    reference = one_process("balanced")
    losses = torch.stack([r["balanced"]["loss"] for r in per_process])
    assert not torch.allclose(losses[0], losses[1])  # each process holds different rollouts
    # Equal numbers of relabelled rollouts per process: the mean of the processes' losses is the global one.
    assert_close_at_scale(losses.mean(), reference["loss"])


def test_gathered_negatives_give_the_single_process_gradients(per_process):
    reference = one_process("balanced")
    # DDP averages gradients over processes; each process's user rows are its own slice of the batch.
    users_grad = torch.cat([r["balanced"]["users_grad"] for r in per_process])  # rows in process order
    assert_close_at_scale(users_grad / WORLD, reference["users_grad"])
    items_grad = sum(r["balanced"]["items_grad"] for r in per_process) / WORLD
    assert_close_at_scale(items_grad, reference["items_grad"])
    # The other process's rollouts push on this process's items: the gradient is not only local.
    own_items = [2, 4]  # targets of process 1
    assert per_process[1]["balanced"]["items_grad"][own_items].abs().sum() > 0
    assert per_process[0]["balanced"]["items_grad"][own_items].abs().sum() == 0


def test_a_process_without_relabelled_rollouts_still_joins_the_gather(per_process):
    assert "one_sided" in SCENARIOS
    reference = one_process("one_sided")
    process0, process1 = (r["one_sided"] for r in per_process)
    assert process1["loss"].item() == 0.0
    assert_close_at_scale(process0["loss"], reference["loss"])
    # Process 1's items are negatives of process 0's rollouts, so they still get their gradient.
    items_grad = process0["items_grad"] + process1["items_grad"]
    assert_close_at_scale(items_grad, reference["items_grad"])
    assert process1["items_grad"][[2, 4]].abs().sum() > 0


def test_a_target_held_by_both_processes_counts_once(per_process):
    reference = one_process("shared")
    process0, process1 = (r["shared"] for r in per_process)
    # Both hold item 5 (gathered twice); with 2 relabelled rollouts each, the mean loss is the global one.
    assert_close_at_scale((process0["loss"] + process1["loss"]) / WORLD, reference["loss"])
    users_grad = torch.cat([process0["users_grad"], process1["users_grad"]])
    assert_close_at_scale(users_grad / WORLD, reference["users_grad"])
    assert_close_at_scale((process0["items_grad"] + process1["items_grad"]) / WORLD, reference["items_grad"])
