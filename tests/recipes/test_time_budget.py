"""TimeBudgetCallback: a CPU run stops cleanly once its wall-clock budget is spent."""

from __future__ import annotations

import types

import pytest
from transformers import TrainerControl, TrainerState

from recipes.trainer import TimeBudgetCallback


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


# ----------------------------------------------------------------------------- the warm-up's share of the budget


class WarmupEnds:
    """Stand-in for RecPOTrainer.end_item_warmup: records the steps at which it was asked to end the warm-up."""

    def __init__(self, state: TrainerState) -> None:
        self.state, self.calls, self.budgets = state, [], []

    def __call__(self, whole_warmup_minutes: float | None = None) -> None:
        self.calls.append(self.state.global_step)
        self.budgets.append(whole_warmup_minutes)


def run_steps(callback, clock, args, state, seconds_per_step: float, steps: int) -> list[TrainerControl]:
    controls = []
    for _ in range(steps):
        state.global_step += 1
        clock[0] += seconds_per_step
        control = TrainerControl()
        callback.on_step_end(args, state, control)
        controls.append(control)
    return controls


def started_warmup(start_step: int = 0):
    """A 100 s budget with 20% kept for RecPO and a 300-step warm-up, started (or resumed) at `start_step`."""
    args = types.SimpleNamespace(item_warmup_steps=300, max_steps=312)
    state = TrainerState(global_step=start_step)
    ends = WarmupEnds(state)
    callback = TimeBudgetCallback(minutes=100 / 60, recpo_share=0.2, end_warmup=ends)
    callback.on_train_begin(args, state, TrainerControl())
    return args, state, ends, callback


def test_warmup_ends_once_it_has_spent_all_but_the_recpo_share(clock):
    # 100 s of budget, 20% kept for RecPO: the warm-up ends after the step that reaches 80 s, and only once.
    args, state, ends, callback = started_warmup()
    controls = run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=7)
    assert ends.calls == [] and not any(c.should_training_stop for c in controls)  # 70 s
    # 80 s: the warm-up's share is spent
    run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=1)
    assert ends.calls == [8]
    args.item_warmup_steps, args.max_steps = 8, 20  # what end_item_warmup does
    controls = run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=2)  # RecPO steps, 100 s
    assert ends.calls == [8]
    assert [c.should_training_stop for c in controls] == [False, True]  # the whole budget still stops the run


def test_the_warmup_end_is_told_the_budget_the_whole_warmup_needs_at_this_pace(clock):
    # 10 s a step, 80 s of 100 spent when the warm-up ends at step 8 of 300: the 300 steps take 3,000 s, and the
    # RecPO share (20%) on top makes a budget of 3,750 s.
    args, state, ends, callback = started_warmup()
    run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=8)
    assert ends.calls == [8]
    assert ends.budgets == [pytest.approx(3750 / 60)]


def test_a_resumed_run_counts_its_pace_from_the_resumed_step(clock):
    # Resumed at step 100: 8 steps of 10 s since, so the pace is 10 s a step, not 80 s over 108 steps.
    args, state, ends, callback = started_warmup(start_step=100)
    run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=8)
    assert ends.calls == [108]
    assert ends.budgets == [pytest.approx((80 + 192 * 10) / 0.8 / 60)]


def test_no_share_or_no_recpo_steps_leaves_the_warmup_alone(clock):
    for share, warmup, max_steps in [(0.0, 300, 312), (0.2, 300, 300), (0.2, 0, 312)]:
        args = types.SimpleNamespace(item_warmup_steps=warmup, max_steps=max_steps)
        state = TrainerState()
        ends = WarmupEnds(state)
        callback = TimeBudgetCallback(minutes=1.0, recpo_share=share, end_warmup=ends)
        callback.on_train_begin(args, state, TrainerControl())
        controls = run_steps(callback, clock, args, state, seconds_per_step=15.0, steps=4)
        assert ends.calls == [], (share, warmup, max_steps)  # a warm-up-only run keeps its whole budget
        assert [c.should_training_stop for c in controls] == [False, False, False, True]


def test_processes_decide_the_warmup_end_together(clock):
    # A stand-in collective that says "some other process has spent it" at once: this process ends its warm-up too.
    asked = []

    def any_process(flag: bool) -> bool:
        asked.append(flag)
        return len(asked) == 1  # the first question of the first step is the warm-up's

    args = types.SimpleNamespace(item_warmup_steps=300, max_steps=312)
    state = TrainerState()
    ends = WarmupEnds(state)
    callback = TimeBudgetCallback(minutes=100.0, on_any_process=any_process, recpo_share=0.2, end_warmup=ends)
    callback.on_train_begin(args, state, TrainerControl())
    run_steps(callback, clock, args, state, seconds_per_step=1.0, steps=1)
    assert asked == [False, False]  # this process had spent neither its warm-up share nor the budget
    assert ends.calls == [1]


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_recpo_share_outside_0_to_1_is_refused(share):
    from recipes.config import ScriptArguments

    with pytest.raises(ValueError, match="time_budget_recpo_share"):
        ScriptArguments(time_budget_recpo_share=share)


# ----------------------------------------------------------------------------- where the progress bar ends


def test_the_progress_bar_ends_where_the_budget_stops_a_long_run(clock):
    # 100 s at 10 s a step stops the run at step 10 of 2,000: the bar ends there, so its time left is the budget's.
    args = types.SimpleNamespace(item_warmup_steps=0, max_steps=2000)
    shown: list[int] = []
    callback = TimeBudgetCallback(minutes=100 / 60, show_last_step=shown.append)
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    controls = run_steps(callback, clock, args, TrainerState(), seconds_per_step=10.0, steps=10)
    assert shown == [10] * 10
    assert [c.should_training_stop for c in controls] == [False] * 9 + [True]


def test_the_progress_bar_keeps_max_steps_when_the_budget_does_not_bind(clock):
    args = types.SimpleNamespace(item_warmup_steps=0, max_steps=5)
    shown: list[int] = []
    callback = TimeBudgetCallback(minutes=100 / 60, show_last_step=shown.append)
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    run_steps(callback, clock, args, TrainerState(), seconds_per_step=10.0, steps=5)
    assert shown == [5] * 5


def test_the_progress_bar_counts_the_warmups_share_then_the_pace_of_the_recpo_steps(clock):
    # 100 s, 20% kept for RecPO, warm-up steps of 10 s: the warm-up will end at step 8 (80 s) and 12 RecPO steps
    # follow, so the bar ends at 20. Then RecPO steps take 5 s: 20 s left at step 8 hold 4 of them, the run
    # stops at step 12 (the first RecPO step is timed at the warm-up's pace, the next ones at their own).
    args = types.SimpleNamespace(item_warmup_steps=300, max_steps=312)
    state = TrainerState()
    shown: list[int] = []

    def end_warmup(whole_warmup_minutes=None):  # what the trainer's end_item_warmup does to the arguments
        args.max_steps = state.global_step + args.max_steps - args.item_warmup_steps
        args.item_warmup_steps = state.global_step

    callback = TimeBudgetCallback(
        minutes=100 / 60, recpo_share=0.2, end_warmup=end_warmup, show_last_step=shown.append
    )
    callback.on_train_begin(args, state, TrainerControl())
    run_steps(callback, clock, args, state, seconds_per_step=10.0, steps=8)
    assert (args.item_warmup_steps, args.max_steps) == (8, 20)
    controls = run_steps(callback, clock, args, state, seconds_per_step=5.0, steps=4)
    assert shown == [20] * 7 + [10, 12, 12, 12, 12]
    assert [c.should_training_stop for c in controls] == [False, False, False, True]
