"""TimeBudgetCallback: a CPU run stops cleanly once its wall-clock budget is spent."""

from __future__ import annotations

import types

import pytest
from transformers import TrainerControl, TrainerState

from recipes import trainer as trainer_module
from recipes.trainer import TimeBudgetCallback


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The seconds `time.perf_counter` returns inside recipes.trainer: set `clock[0]` to move time."""
    now = [1000.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def step_end_at(callback: TimeBudgetCallback, clock: list[float], seconds: float) -> TrainerControl:
    control = TrainerControl()
    clock[0] = 1000.0 + seconds
    callback.on_step_end(None, TrainerState(), control)
    return control


def test_budget_not_reached_lets_training_continue(clock):
    callback = TimeBudgetCallback(minutes=0.5)
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    for seconds in (0.0, 0.5, 29.9):  # 0.5 minutes is 30 s, not 0.5 s
        control = step_end_at(callback, clock, seconds)
        assert not control.should_training_stop and not control.should_save, seconds


@pytest.mark.parametrize("seconds", [30.0, 31.0])  # the budget is spent at exactly 30 s
def test_spent_budget_stops_training_and_saves(clock, seconds):
    callback = TimeBudgetCallback(minutes=0.5)
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    control = step_end_at(callback, clock, seconds)
    assert control.should_training_stop
    assert control.should_save


def test_the_budget_counts_from_the_start_of_training(clock):
    callback = TimeBudgetCallback(minutes=0.5)
    assert not step_end_at(callback, clock, 200.0).should_training_stop  # not started: no budget runs yet
    callback.on_train_begin(None, TrainerState(), TrainerControl())  # at 200 s
    assert not step_end_at(callback, clock, 229.0).should_training_stop
    assert step_end_at(callback, clock, 230.0).should_training_stop
