"""RecPOTrainer on a tiny random Llama and a tiny synthetic dataset: rollouts, rewards, advantages, runs, resume.

Every number the trainer produces here is recomputed independently (a plain forward per sequence, cosines,
ranks, rewards and advantages by hand: the helpers of test_evaluation.py), and the runs go through
`recipes.recpo.main` or the command line, as a user runs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from recipes import recpo
from recipes import trainer as trainer_module
from recipes.evaluation import sample_indices
from rewards.ranking import ranking_metrics
from tests.numerics import assert_close_at_scale
from tests.recipes.conftest import build_trainer, chain_model, recpo_args
from tests.recipes.test_evaluation import (
    hand_ndcg,
    hand_scores,
    hand_softmax,
    plain_vectors,
    rank_window,
)

REPO = Path(__file__).resolve().parents[2]
MARKER = "<answer>"
METRICS = {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}


def marker_ids(tokenizer) -> list[int]:
    return tokenizer.encode(MARKER, add_special_tokens=False)


def prompts_of(trainer, rows: list[dict]) -> list[list[int]]:
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    return prompt_ids


# ----------------------------------------------------------------------------- rollouts


def test_rollout_without_marker_gets_it_appended(tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out")
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    completions, _ = trainer._generate_single_turn(prompts_of(trainer, rows), None, {}, 2)
    marker = marker_ids(tokenizer)
    assert len(completions) == 2
    for ids in completions:
        assert ids[-len(marker) :] == marker
        assert trainer.closer.marker_end(ids[: -len(marker)]) is None  # the random model never wrote it
        assert tokenizer.eos_token_id not in ids
        assert len(ids) <= trainer.args.max_completion_length + len(marker)
    assert trainer._metrics["train"]["completions/marker_written_ratio"][-1] == 0.0


def test_rollout_that_writes_the_marker_is_cut_right_after_it(tokenizer, synthetic_data, tmp_path):
    script = tokenizer.encode("Because I liked it <answer> then", add_special_tokens=False)
    probe = build_trainer(tokenizer, synthetic_data, tmp_path / "probe", lora=False)
    prompts = prompts_of(probe, [probe.train_dataset[i] for i in (0, 1)])
    assert {p[-1] for p in prompts} == {prompts[0][-1]}  # every chat prompt ends with the same token
    model = chain_model(tokenizer, {prompts[0][-1]: script})
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", model=model, lora=False)
    trainer.model.train()
    completions, _ = trainer._generate_single_turn(prompts, None, {}, 2)
    cut = script.index(marker_ids(tokenizer)[-1]) + 1
    assert completions == [script[:cut]] * 2
    assert trainer._metrics["train"]["completions/marker_written_ratio"][-1] == 1.0


# ----------------------------------------------------------------------------- rewards and advantages


def rollout_sequences(output: dict) -> list[list[int]]:
    """Prompt + completion token ids of each rollout, padding dropped."""
    rows = zip(
        output["prompt_ids"],
        output["prompt_mask"],
        output["completion_ids"],
        output["completion_mask"],
        strict=True,
    )
    return [p[m.bool()].tolist() + c[cm.bool()].tolist() for p, m, c, cm in rows]


@pytest.mark.parametrize("fast_rollouts", [True, False])
def test_advantages_are_recpo_group_advantages_of_the_fused_reward(
    tokenizer, synthetic_data, tmp_path, monkeypatch, fast_rollouts
):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        per_device_train_batch_size=8,
        num_generations=4,
        relabel_topk=2,
        advantage_kind="leave_one_out",  # differs from TRL's own (r - mean) / std
        temperature=4.0,
        fast_rollouts=fast_rollouts,
    )
    calls = []  # which path sampled the rollouts: RecPO's loop, or TRL's generate
    loop = trainer_module.reason_and_encode
    monkeypatch.setattr(trainer_module, "reason_and_encode", lambda *a, **k: calls.append(1) or loop(*a, **k))
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    inputs = [dict(row) for row in rows for _ in range(4)]  # distinct dicts, as TRL's dataloader yields
    output = trainer._generate_and_score_completions(inputs)
    assert len(calls) == int(fast_rollouts)

    # Independently: a plain forward per rollout and per item, cosines, ranks and rewards by hand.
    model = trainer.model
    sequences = rollout_sequences(output)
    assert all(tokenizer.decode(s).endswith(MARKER) for s in sequences)
    scores = hand_scores(
        plain_vectors(model, sequences),
        plain_vectors(model, trainer.item_prompt_ids),
        trainer.args.similarity_temperature,
    )
    targets, histories = [row["target"] for row in inputs], [row["history"] for row in inputs]
    rewards = trainer._last_rewards_per_func  # (8, 2): ndcg, softmax
    softmax_by_hand = [hand_softmax(*case) for case in zip(scores, targets, histories, strict=True)]
    assert_close_at_scale(rewards[:, 1], torch.tensor(softmax_by_hand), name="softmax reward")
    exact = 0
    for j in range(8):
        best, worst = rank_window(scores[j], targets[j], histories[j])
        ndcg = rewards[j, 0].item()
        assert hand_ndcg(worst) - 1e-6 <= ndcg <= hand_ndcg(best) + 1e-6, f"rollout {j}: ranks {best}-{worst}"
        exact += best == worst
    assert exact >= 5, f"only {exact} of 8 rollouts have a clearly separated target"
    # Leave-one-out advantages of the fused reward 0.95 NDCG + 0.05 P: r_j minus the mean of its group's others.
    fused = [0.95 * n + 0.05 * p for n, p in rewards.tolist()]
    expected = []
    for g in range(2):
        group = fused[4 * g : 4 * g + 4]
        expected += [r - (sum(group) - r) / 3 for r in group]
    assert_close_at_scale(output["advantages"], torch.tensor(expected), name="advantages")
    assert output["advantages"].abs().sum() > 0  # rollouts of a group differ: the check is not 0 == 0
    assert list(trainer._logs["advantages"])[-8:] == pytest.approx(output["advantages"].tolist())

    relabel = output["relabel_mask"].view(2, 4)
    assert relabel.sum(1).tolist() == [2, 2]
    grouped = output["advantages"].view(2, 4)
    for g in range(2):
        assert grouped[g][relabel[g]].min() >= grouped[g][~relabel[g]].max()
    assert output["target_index"].tolist() == targets


def test_active_dropout_sends_rollouts_to_generate(tokenizer, synthetic_data, tmp_path, caplog):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out")
    trainer.model.get_base_model().model.layers[0].mlp.register_module("drop", torch.nn.Dropout(0.1))
    trainer.model.train()
    with caplog.at_level("INFO", logger="recipes.trainer"):
        assert trainer._fast_rollout_sampling(None, {})[0] is False
        trainer.model.eval()
        assert trainer._fast_rollout_sampling(None, {})[0] is True  # eval mode: the dropout is off
    assert "disable_dropout" in caplog.text


@pytest.mark.parametrize("fresh_targets", [False, True])
def test_rollouts_are_scored_before_or_after_the_target_rows_are_refreshed(
    tokenizer, synthetic_data, tmp_path, fresh_targets
):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        per_device_train_batch_size=8,
        num_generations=4,
        temperature=4.0,
        score_with_fresh_targets=fresh_targets,
    )
    model = trainer.model
    current = plain_vectors(model, trainer.item_prompt_ids).float()
    # An index from an older policy: every row off its current vector.
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    stale = current + 0.5 * current.std() * noise
    trainer.item_index, trainer.index_step = stale.clone(), 0
    model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    inputs = [dict(row) for row in rows for _ in range(4)]
    output = trainer._generate_and_score_completions(inputs)

    targets = sorted({row["target"] for row in rows})
    assert_close_at_scale(trainer.item_index[targets], current[targets], name="refreshed rows")
    others = [i for i in range(len(current)) if i not in targets]
    assert torch.equal(trainer.item_index[others], stale[others])  # the other rows are left as they were
    with_fresh_targets = stale.clone()
    with_fresh_targets[targets] = current[targets]
    users = plain_vectors(model, rollout_sequences(output))
    cases = [(row["target"], row["history"]) for row in inputs]

    def windows_against(index) -> list[tuple[int, int]]:
        """Each rollout's best and worst rank by hand (equal where its target stands clear of every other)."""
        scores = hand_scores(users, index, trainer.args.similarity_temperature)
        return [rank_window(row, *case) for row, case in zip(scores, cases, strict=True)]

    scored, other = (with_fresh_targets, stale) if fresh_targets else (stale, with_fresh_targets)
    windows = windows_against(scored)
    for j, (best, worst) in enumerate(windows):
        ndcg = trainer._last_rewards_per_func[j, 0].item()
        assert hand_ndcg(worst) - 1e-6 <= ndcg <= hand_ndcg(best) + 1e-6, f"rollout {j}: ranks {best}-{worst}"
    assert sum(best == worst for best, worst in windows) >= 5  # most rollouts compared exactly
    assert windows_against(other) != windows  # the order is visible in the rewards


# ----------------------------------------------------------------------------- whole runs


def log_history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def assert_results_file(output_dir: Path, splits: tuple[str, ...], name: str = "results.json") -> dict:
    """The metrics of each split, and per-user ranks of the seeded users from which those metrics follow."""
    results = json.loads((output_dir / name).read_text())
    assert set(results) == {*splits, "per_user"}
    data = load_from_disk(json.loads((output_dir / "run_config.json").read_text())["data_dir"])
    limits = {"valid": 4, "test": 4}  # max_eval_users / max_test_users of recpo_args
    for split in splits:
        assert set(results[split]) == METRICS
        assert all(0.0 <= v <= 1.0 for v in results[split].values())
        record = results["per_user"][split]
        assert record["sample_index"] == sample_indices(len(data[split]), limits[split], 42)
        assert results[split] == pytest.approx(ranking_metrics(torch.tensor(record["rank"])))
    return results


def test_two_step_run_writes_results_and_logs_reward_metrics(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = recpo_args(
        out,
        tiny_model_dir,
        synthetic_data,
        evaluate_before=True,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
    )
    returned = recpo.main(*args)

    results = assert_results_file(out, ("valid", "test"))
    assert returned == results
    assert_results_file(out, ("valid", "test"), "results_before.json")
    assert (out / "adapter_model.safetensors").is_file() and (out / "item_index.pt").is_file()
    final_history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert final_history[0]["step"] == 0 and "before/valid/ndcg@10" in final_history[0]  # survived train()
    history = log_history(out / "checkpoint-2")
    train_logs = [e for e in history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2]
    for entry in train_logs:
        for key in ("rewards/ndcg/mean", "rewards/softmax/mean", "reward", "item_loss", "loss"):
            assert math.isfinite(entry[key]), key
        assert 0.0 <= entry["rewards/ndcg/mean"] <= 1.0
    assert [e["step"] for e in history if "valid/ndcg@10" in e] == [1, 2]
    # The evaluation's mean rank is the mean of the ranks its traces hold; the catalog's crowding is a cosine.
    last_eval = [e for e in history if "valid/ndcg@10" in e][-1]
    traced = [
        json.loads(line)["rank"]
        for line in (out / "traces" / "valid_step000002.jsonl").read_text().splitlines()
    ]
    assert last_eval["valid/mean_rank"] == pytest.approx(sum(traced) / len(traced))
    assert -1.0 <= last_eval["index/mean_cosine"] <= 1.0
    assert last_eval["index/score_spread"] > 0.0


def test_a_cpu_recpo_step_prints_no_notice_a_user_cannot_act_on(tokenizer, synthetic_data, tmp_path):
    """peft and TRL 1.16 read `is_gradient_checkpointing`, renamed in transformers 5: its FutureWarning would come
    with the trainer and again with every RecPO step's rollouts. Pinned memory needs an accelerator: torch's notice
    came with every data loader on a CPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # use_cpu unset, as `make train` leaves it: accelerate falls back to the CPU where there is no accelerator.
        trainer = build_trainer(tokenizer, synthetic_data, tmp_path, max_steps=1, use_cpu=False)
        trainer.train()
    assert trainer.state.global_step == 1
    notices = [str(w.message) for w in caught]
    assert [n for n in notices if "checkpointing" in n or "pin_memory" in n] == []


def test_mean_pairwise_cosine_matches_the_mean_over_pairs():
    from recipes.evaluation import mean_pairwise_cosine

    vectors = torch.randn(37, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    pairs = unit @ unit.T
    expected = pairs[~torch.eye(37, dtype=torch.bool)].mean().item()
    assert mean_pairwise_cosine(vectors) == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_cosine(vectors[:1, :]) != mean_pairwise_cosine(vectors[:1, :])  # nan: no pair


def test_no_reasoning_mode_trains_and_evaluates(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    args = recpo_args(
        out, tiny_model_dir, synthetic_data, reasoning=False, save_strategy="steps", save_steps=2
    )
    recpo.main(*args)

    assert_results_file(out, ("valid", "test"))
    train_logs = [e for e in log_history(out / "checkpoint-2") if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2]
    for entry in train_logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["item_loss"])
        assert entry["item_loss"] > 0  # cross-entropy over the in-batch targets
    traces = sorted((out / "traces").glob("valid_step*.jsonl"))
    assert traces and all(json.loads(line)["reasoning"] == "" for line in traces[-1].read_text().splitlines())


def test_item_warmup_steps_train_without_reasoning_then_recpo_takes_over(
    tiny_model_dir, synthetic_data, tmp_path
):
    out = tmp_path / "run"
    args = recpo_args(
        out,
        tiny_model_dir,
        synthetic_data,
        item_warmup_steps=2,
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
        log_completions=True,
    )
    recpo.main(*args)
    # Rollout tables only once there are rollouts: none (and no empty ones) for the warm-up's steps.
    assert [p.name for p in sorted((out / "completions").glob("*.parquet"))] == ["completions_00003.parquet"]

    train_logs = [e for e in log_history(out / "checkpoint-3") if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3]
    warmup, recpo_step = train_logs[:2], train_logs[2]
    assert all("reward" not in e and e["item_loss"] > 0 for e in warmup)  # cross-entropy, no rollouts
    assert "reward" in recpo_step and math.isfinite(recpo_step["reward"])
    traces = sorted((out / "traces").glob("valid_step*.jsonl"))
    assert traces and all(json.loads(line)["reasoning"] for line in traces[-1].read_text().splitlines())


@pytest.mark.parametrize(
    ("warmup", "refresh", "built_at"),
    [
        (0, 0, [0]),  # built once, then only evaluations rebuild it
        (2, 0, [0, 2]),  # stale once the item warm-up ended, then kept
        (0, 2, [0, 2, 4]),  # every `index_refresh_steps` steps
        (2, 3, [0, 2, 5]),  # the warm-up's end, then 3 steps after that rebuild
    ],
)
def test_the_item_index_is_built_at_the_start_and_rebuilt_on_its_schedule(
    tokenizer, synthetic_data, tmp_path, monkeypatch, warmup, refresh, built_at
):
    trainer = build_trainer(
        tokenizer, synthetic_data, tmp_path / "out", item_warmup_steps=warmup, index_refresh_steps=refresh
    )
    built, build = [], trainer.refresh_item_index
    monkeypatch.setattr(
        trainer, "refresh_item_index", lambda: built.append(trainer.state.global_step) or build()
    )
    indexes = []
    for step in range(6):
        trainer.state.global_step = step
        indexes.append(trainer._ensure_index())
        assert trainer.index_step == max(s for s in built_at if s <= step)
        assert indexes[-1] is trainer.item_index
    assert built == built_at
    assert indexes[0].shape == (len(trainer.items), trainer.model.config.hidden_size)
    for step in range(1, 6):  # a rebuild is a new tensor; between rebuilds the same one is reused
        assert (indexes[step] is not indexes[step - 1]) == (step in built_at), step


@pytest.mark.parametrize("collapsed", [True, False])
def test_the_end_of_the_item_warm_up_measures_the_spread_and_warns_when_the_vectors_collapsed(
    tokenizer, synthetic_data, tmp_path, monkeypatch, caplog, collapsed
):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", item_warmup_steps=2)
    build = trainer.refresh_item_index

    def refresh():
        index = build()
        if collapsed and trainer.state.global_step >= 2:  # what a collapsed warm-up leaves: one direction
            index = index[:1].expand_as(index) + 1e-5 * torch.randn_like(index)
        trainer.item_index = index
        return index

    monkeypatch.setattr(trainer, "refresh_item_index", refresh)
    with caplog.at_level(logging.WARNING, logger="recipes.trainer"):
        for step in range(3):
            trainer.state.global_step = step
            trainer._ensure_index()
    spreads = trainer._metrics["train"]["index/score_spread"]
    assert len(spreads) == 1  # measured once, when RecPO's first step rebuilt the index
    warned = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    if collapsed:
        assert spreads[0] < 0.1
        assert len(warned) == 1 and "after the 2 item warm-up steps" in warned[0]
    else:
        assert spreads[0] > 0.1 and not warned


def warmup_restart_run(out: Path, model_dir: Path, data_dir: Path, **extra) -> list[str]:
    return recpo_args(
        out,
        model_dir,
        data_dir,
        item_warmup_steps=3,
        max_steps=4,
        warmup_restarts=1,
        warmup_restart_check_steps=2,
        save_strategy="steps",
        save_steps=2,
        **extra,
    )


def resume_from_step_4(out: Path, resumed: Path, model_dir: Path, data_dir: Path, **extra) -> list[dict]:
    """Resume a copy of `warmup_restart_run`'s checkpoint-4 in `resumed`; the step logs of its checkpoint-6."""
    shutil.copytree(out / "checkpoint-4", resumed / "checkpoint-4")
    recpo.main(
        *warmup_restart_run(
            resumed, model_dir, data_dir, resume_from_checkpoint=str(resumed / "checkpoint-4"), **extra
        )
    )
    return [e for e in log_history(resumed / "checkpoint-6") if "loss" in e]


@pytest.mark.parametrize("collapsed", [True, False])
def test_a_collapsed_warm_up_starts_over_once_with_new_factors_and_runs_the_steps_it_spent_again(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch, caplog, collapsed
):
    # The tiny random model's spread is whatever it is: the threshold decides here which way the check goes.
    monkeypatch.setattr(trainer_module, "COLLAPSED_SPREAD", 1e9 if collapsed else 0.0)
    redrawn = []
    real_redraw = trainer_module.redraw_lora
    monkeypatch.setattr(
        trainer_module, "redraw_lora", lambda model, seed: redrawn.append(seed) or real_redraw(model, seed)
    )
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="recipes.trainer"):
        recpo.main(*warmup_restart_run(out, tiny_model_dir, synthetic_data))
    last = 6 if collapsed else 4
    logs = [e for e in log_history(out / f"checkpoint-{last}") if "loss" in e]
    assert [e["step"] for e in logs] == list(range(1, last + 1))
    warmup_steps = 5 if collapsed else 3  # the 2 steps spent before the restart are run again
    assert all("reward" not in e for e in logs[:warmup_steps])
    assert all("reward" in e for e in logs[warmup_steps:])
    assert all(e["item/batch_spread"] > 0 for e in logs[:warmup_steps])
    checks = [e for e in logs if "warmup/check_spread" in e]
    warned = [r.getMessage() for r in caplog.records if "collapsed in the first" in r.getMessage()]
    if collapsed:
        # checked at step 2 of the first start only: one restart allowed, so its second start is not checked
        assert [e["step"] for e in checks] == [3]
        assert redrawn == [43]  # seed 42 + restart 1
        assert len(warned) == 1 and "restart 1 of at most 1" in warned[0]
        assert not (out / "checkpoint-2" / trainer_module.RESTARTS_FILE).exists()  # saved before the restart
        record = json.loads((out / "checkpoint-4" / trainer_module.RESTARTS_FILE).read_text())
        assert record == {"restarts": 1, "started_at": 2, "extra_steps": 2}
        run_config = json.loads((out / "run_config.json").read_text())
        assert run_config["training"]["changed"]["item_warmup_steps"]["value"] == 5  # what the run did
    else:
        assert [e["step"] for e in checks] == [3] and not redrawn and not warned


def test_a_warm_up_restart_spreads_a_decaying_learning_rate_over_the_lengthened_run_and_a_resume_follows_it(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer_module, "COLLAPSED_SPREAD", 1e9)
    linear = {"lr_scheduler_type": "linear", "warmup_steps": 0}
    out = tmp_path / "run"
    recpo.main(*warmup_restart_run(out, tiny_model_dir, synthetic_data, **linear))
    rates = {e["step"]: e["learning_rate"] for e in log_history(out / "checkpoint-6") if "loss" in e}
    # Steps 1-2 run on the planned 4 steps: 1e-3 x (4 - 0) / 4, (4 - 1) / 4. The restart before step 3 makes the
    # run 6 steps long, and the decay spans them from there: (6 - 2) / 6 ... (6 - 5) / 6. Without the rebuild
    # steps 5 and 6 would run at rate 0.
    expected = {1: 4 / 4, 2: 3 / 4, 3: 4 / 6, 4: 3 / 6, 5: 2 / 6, 6: 1 / 6}
    assert rates == pytest.approx({step: 1e-3 * share for step, share in expected.items()}, rel=1e-6)

    resumed = resume_from_step_4(out, tmp_path / "resumed", tiny_model_dir, synthetic_data, **linear)
    resumed_rates = {e["step"]: e["learning_rate"] for e in resumed}
    assert {s: resumed_rates[s] for s in (5, 6)} == pytest.approx({s: rates[s] for s in (5, 6)}, rel=1e-6)


def test_a_warm_up_restart_clears_adams_state_and_lengthens_the_run_by_the_steps_spent(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        item_warmup_steps=10,
        max_steps=12,
        warmup_restarts=1,
        warmup_restart_check_steps=4,
    )
    trainer.create_optimizer()
    trainer.state.max_steps = 12
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    trainer.optimizer.state[param] = {"step": torch.tensor(4.0), "exp_avg": torch.ones_like(param)}
    trainer.model.train()
    trainer._batch_spreads.extend([0.5] * 5 + [0.01] * 10)  # only the last 10 steps count
    trainer.state.global_step = 3
    assert not trainer.restart_warmup_if_collapsed()  # not the check step yet
    trainer.state.global_step = 4
    assert trainer.restart_warmup_if_collapsed()
    assert not trainer.optimizer.state  # Adam starts over with the new factors
    assert (trainer.args.item_warmup_steps, trainer.args.max_steps, trainer.state.max_steps) == (14, 16, 16)
    assert trainer.warmup_started_at == 4 and trainer.warmup_restarts_done == 1
    assert trainer._metrics["train"]["warmup/check_spread"] == [pytest.approx(0.01)]
    assert not trainer.restart_warmup_if_collapsed()  # the same step's other micro-batches: checked once
    trainer.state.global_step = 8
    trainer._batch_spreads.extend([0.01] * 10)
    assert not trainer.restart_warmup_if_collapsed()  # the one restart allowed is spent


def test_a_resumed_run_takes_its_warm_up_restart_back_from_the_checkpoint(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer_module, "COLLAPSED_SPREAD", 1e9)
    out = tmp_path / "run"
    recpo.main(*warmup_restart_run(out, tiny_model_dir, synthetic_data))
    logs = resume_from_step_4(out, tmp_path / "resumed", tiny_model_dir, synthetic_data)
    # Without the record the resumed run would end at the configured max_steps 4, its warm-up at step 3.
    assert [e["step"] for e in logs if e["step"] > 4] == [5, 6]
    assert "reward" not in logs[-2] and "reward" in logs[-1]
    assert not [e for e in logs if e["step"] > 4 and "warmup/check_spread" in e]  # no second restart


def test_a_training_step_moves_each_lora_weight_by_adams_first_step_and_no_frozen_weight(
    tokenizer, synthetic_data, tmp_path
):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    trainer = build_trainer(
        tokenizer, synthetic_data, tmp_path / "out", random_lora_b=True, max_steps=1, temperature=4.0
    )
    model = trainer.model
    names = {id(p): name for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}  # the gradients the optimiser steps with (clipped)

    def keep_gradients(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            grads.update(
                {names[id(p)]: p.grad.detach().clone() for p in group["params"] if p.grad is not None}
            )

    handle = register_optimizer_step_pre_hook(keep_gradients)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert trainer.state.global_step == 1
    after = {name: p.detach() for name, p in model.named_parameters()}
    lora = sorted(name for name in before if "lora_" in name)
    assert len(lora) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert sorted(grads) == lora  # the optimiser steps the adapter only

    # Clipping at max_grad_norm 1.0 scaled the gradient the trainer logged.
    logged_norm = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e][-1]
    clipped_norm = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    assert clipped_norm == pytest.approx(min(logged_norm, trainer.args.max_grad_norm), rel=1e-4)
    # Adam's first step: m = (1 - b1) g and v = (1 - b2) g^2 bias-corrected to g and g^2, so each weight moves
    # by -lr g / (|g| + eps): lr wherever |g| >> eps (constant schedule, no warm-up, no weight decay).
    lr, eps = trainer.args.learning_rate, trainer.args.adam_epsilon
    for name in lora:
        g = grads[name].double()
        assert_close_at_scale(after[name] - before[name], -lr * g / (g.abs() + eps), rel=1e-3, name=name)
    moved = torch.cat([(after[name] - before[name]).abs().flatten() for name in lora])
    assert (moved > 0.99 * lr).float().mean().item() > 0.9  # the learning rate, not a rescaled one
    # The frozen weights: unchanged, to the rounding that merging the adapter for generation and unmerging it
    # leaves (float32, an ulp or two of the weight: 1e-8 here, against steps of lr = 1e-3).
    for name in before:
        if name not in grads:
            assert_close_at_scale(after[name], before[name], rel=1e-6, name=name)
            if "base_layer" not in name:  # no adapter merged into it: exactly as it was
                assert torch.equal(after[name], before[name]), name


def test_early_stopping_stops_a_run_whose_valid_ndcg_does_not_improve(tokenizer, synthetic_data, tmp_path):
    from transformers import EarlyStoppingCallback

    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        max_steps=5,
        learning_rate=0.0,  # the model never changes, so valid NDCG@10 never improves
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    assert trainer.state.global_step == 2
    # Each evaluation runs once: the end of training does not evaluate the last step again.
    assert [e["step"] for e in trainer.state.log_history if "valid/ndcg@10" in e] == [1, 2]


# ----------------------------------------------------------------------------- resume


def cli(model_dir: Path, data_dir: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "recipes" / "recpo.py"),
        "--model_name_or_path", str(model_dir),
        "--data_dir", str(data_dir),
        "--output_dir", str(out),
        "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "4",
        "--num_generations", "2",
        "--max_completion_length", "8",
        "--max_train_samples", "64",
        "--max_eval_users", "4",
        "--max_test_users", "4",
        "--evaluate_before", "false",
        "--evaluate_test", "false",
        "--eval_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", "1",
        "--report_to", "none",
        "--logging_steps", "1",
        "--learning_rate", "1e-3",
        "--warmup_steps", "0",
        "--use_peft", "true",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--lora_target_modules", "q_proj", "v_proj",
        "--gradient_checkpointing", "false",
        "--early_stopping_patience", "0",
        "--log_completions", "false",
        "--disable_tqdm", "true",
        "--precision", "float32",
        *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_killed_run_resumes_from_its_checkpoint_and_continues(tiny_model_dir, synthetic_data, tmp_path):
    out = tmp_path / "run"
    log = (tmp_path / "killed.log").open("w")
    first = subprocess.Popen(
        cli(tiny_model_dir, synthetic_data, out, 1000), env=subprocess_env(), stdout=log, stderr=log
    )
    checkpoint = out / "checkpoint-1"
    try:
        deadline = time.monotonic() + 240
        while not (checkpoint / "trainer_state.json").is_file():  # written last by the Trainer
            assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-1 within 240 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    for later in out.glob("checkpoint-*"):  # a later checkpoint may be half written when the kill lands
        if later != checkpoint:
            shutil.rmtree(later)
    # Mark the checkpoint's state: the resumed run must carry this entry over, not start afresh.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    state["log_history"][0]["resume_probe"] = 1.0
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    resumed = subprocess.run(
        cli(tiny_model_dir, synthetic_data, out, 3, "--resume_from_checkpoint", str(checkpoint)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert final["global_step"] == 3
    train_steps = [e["step"] for e in final["log_history"] if "loss" in e]
    assert train_steps == [1, 2, 3]
    assert final["log_history"][0].get("resume_probe") == 1.0
    assert all(math.isfinite(e["loss"]) for e in final["log_history"] if "loss" in e)
    assert_results_file(out, ("valid",))


def test_data_seed_orders_the_training_data(tokenizer, synthetic_data, tmp_path):
    def order(**overrides) -> list[int]:
        trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", **overrides)
        return list(trainer._get_train_sampler())

    default = order()
    assert order() == default  # the same seed, the same order
    assert order(data_seed=7) != default  # data_seed reorders (TRL alone would ignore it)
    assert sorted(order(data_seed=7)) == sorted(default)  # the same samples, the same repeats
