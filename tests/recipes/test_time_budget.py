"""TimeBudgetCallback: a CPU run stops cleanly once its wall-clock budget is spent."""

from __future__ import annotations

from transformers import TrainerControl, TrainerState

from recipes.trainer import TimeBudgetCallback


def test_budget_not_reached_lets_training_continue():
    callback = TimeBudgetCallback(minutes=60)
    control = TrainerControl()
    callback.on_train_begin(None, TrainerState(), control)
    callback.on_step_end(None, TrainerState(), control)
    assert not control.should_training_stop


def test_spent_budget_stops_training_and_saves():
    callback = TimeBudgetCallback(minutes=0)
    control = TrainerControl()
    callback.on_train_begin(None, TrainerState(), control)
    callback.on_step_end(None, TrainerState(), control)
    assert control.should_training_stop
    assert control.should_save
