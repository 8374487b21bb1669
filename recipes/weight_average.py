"""A running mean of a model's trainable weights: the `item_warmup_average_steps` option (stochastic weight averaging).

The warm-up's item loss takes noisy steps at a constant step size, and where a run ends on that path is partly
chance. The mean of the weights over the warm-up's last steps sits nearer the middle of the region the path
wanders through; the run goes on from it. Only the trainable weights (the LoRA factors) are kept, in float32.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """The mean of the trainable parameters over the steps `add` was called at (by name, float32)."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, model: nn.Module, step: int) -> None:
        """Count the weights the model holds after optimizer step `step`."""
        with torch.no_grad():
            for name, param in trainable(model):
                if name in self.total:
                    self.total[name].add_(param.detach().float())
                else:
                    self.total[name] = param.detach().float().clone()
        self.count += 1
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step

    def copy_to(self, model: nn.Module) -> None:
        """Replace the model's trainable weights by their mean (in each parameter's own dtype)."""
        if not self.count:
            raise ValueError("no weights were added to the average")
        params = dict(trainable(model))
        if params.keys() != self.total.keys():
            raise ValueError(
                "the model's trainable parameters are not the averaged ones: "
                f"{sorted(params.keys() ^ self.total.keys())[:3]}..."
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.total[name] / self.count)

    def state_dict(self) -> dict:
        return {
            "total": self.total,
            "count": self.count,
            "first_step": self.first_step,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.total = dict(state["total"])
        self.count = int(state["count"])
        self.first_step = state["first_step"]
        self.last_step = state["last_step"]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]
