"""Launched by test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2`: RecPOTrainer's
item loss with negatives gathered across processes, on this process's slice of a global batch.

Every process builds the same global batch (tests/recipes/mp_batch.py) and keeps its own rows. The item
vectors come from a shared table through a stand-in for the trainer's `_item_vectors`, so the loss is
`RecPOTrainer._item_loss` itself (unique targets, gathered negatives, the item surrogate).
Writes `<out>/rank<r>.pt`: world size, and per scenario the local loss and the gradients of the
user rows and of the item table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.trainer import RecPOTrainer, gather_with_grad  # noqa: E402
from tests.recipes.mp_batch import SCENARIOS, global_batch  # noqa: E402


def stand_in_trainer(accelerator: Accelerator, table: torch.Tensor, tau: float) -> SimpleNamespace:
    trainer = SimpleNamespace(
        accelerator=accelerator,
        args=SimpleNamespace(
            similarity_temperature=tau,
            epsilon=0.2,
            epsilon_high=0.28,
            gather_negatives=True,
            item_negatives=0,  # the paper's in-batch columns only
        ),
        item_prompt_ids=[None] * len(table),
        _item_vectors=lambda model, columns: table[torch.as_tensor(columns)],
        item_log_q=None,  # the paper's loss, no log-q correction
        prior_bias=None,  # and no popularity prior
    )
    trainer._gather_negatives = lambda vecs: gather_with_grad(vecs, accelerator)
    trainer._uniform_negatives = lambda columns: RecPOTrainer._uniform_negatives(trainer, columns)
    trainer._column_bias = lambda *args: RecPOTrainer._column_bias(trainer, *args)
    return trainer


def run(accelerator: Accelerator, scenario: str) -> dict:
    batch = global_batch(scenario)
    rank = accelerator.process_index
    rows = slice(rank * batch["per_process"], (rank + 1) * batch["per_process"])
    users = batch["users"][rows].clone().requires_grad_(True)  # (R_local, d)
    table = batch["items"].clone().requires_grad_(True)  # (items, d): only the rows of local targets are used
    trainer = stand_in_trainer(accelerator, table, batch["tau"])
    loss = RecPOTrainer._item_loss(
        trainer, None, users, batch["targets"][rows], batch["advantages"][rows], batch["mask"][rows]
    )
    loss.backward()
    return {"loss": loss.detach(), "users_grad": users.grad, "items_grad": table.grad}


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    results = {name: run(accelerator, name) for name in SCENARIOS}
    results["world"] = accelerator.num_processes
    torch.save(results, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
