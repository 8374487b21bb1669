"""The global batch of the multi-process item-loss test, built alike by every process and by the test."""

from __future__ import annotations

import torch

# balanced: 2 relabelled rollouts on each process, 3 and 2 distinct targets (unequal counts on purpose).
# one_sided: process 1 holds no relabelled rollout (a group split across processes can do that).
# shared: item 5 is a target on both processes, so the gathered negatives hold it twice.
SCENARIOS = ("balanced", "one_sided", "shared")
TARGETS = {
    "balanced": [5, 5, 1, 7, 2, 2, 4, 4],  # items of process 0 and of process 1 do not overlap
    "one_sided": [5, 5, 1, 7, 2, 2, 4, 4],
    "shared": [5, 5, 1, 7, 5, 5, 4, 4],
}
ADVANTAGES = [1.0, -1.0, 0.7, -0.7, 0.3, -0.3, 1.2, -1.2]
MASKS = {
    "balanced": [True, False, True, False, True, False, True, False],
    "one_sided": [True, False, True, True, False, False, False, False],
    "shared": [True, False, True, False, True, False, True, False],
}


def global_batch(scenario: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "per_process": 4,
        "users": torch.randn(8, 16, generator=gen),
        "items": torch.randn(9, 16, generator=gen),
        "targets": torch.tensor(TARGETS[scenario]),
        "advantages": torch.tensor(ADVANTAGES),
        "mask": torch.tensor(MASKS[scenario]),
        "tau": 0.5,  # a soft softmax, so every negative gets a visible gradient
    }
