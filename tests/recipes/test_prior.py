"""The popularity prior in the trainer and the commands: s(u, i) = cos / tau + lambda log q(i) everywhere a score is
used (rewards, evaluation, item loss), stored with the run and read back by recipes.evaluate / recipes.recommend.

Expected values are written out by hand here: log q from counted targets, the item loss from plain item vectors,
and ranks bounded by the popularity order (with a prior weight so large that it decides every rank).
"""

from __future__ import annotations

import math
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from recipes import evaluate, recommend
from tests.numerics import assert_close_at_scale
from tests.recipes.conftest import build_trainer
from tests.recipes.test_losses import ADVANTAGES, RELABEL, plain_item_vectors

FAST = ["--max-new-tokens", "4", "--threads", "1", "--item-batch-size", "64", "--dtype", "float32"]


def hand_log_q(targets, num_items: int) -> torch.Tensor:
    counts = Counter(targets)
    return torch.tensor([math.log((counts[i] + 1) / (len(targets) + num_items)) for i in range(num_items)])


def item_loss_setup(trainer):
    """Random user vectors, four rollouts over a popular and a rare target, and the plain vectors of both items."""
    torch.manual_seed(0)
    users = torch.randn(4, trainer.model.config.hidden_size, requires_grad=True)
    counts = Counter(trainer.train_dataset["target"])
    common, rare = counts.most_common()[0][0], min(range(len(trainer.items)), key=lambda i: counts[i])
    targets = torch.tensor([common, common, rare, rare])
    columns, inverse = torch.unique(targets, return_inverse=True)
    with torch.no_grad():
        items = plain_item_vectors(trainer.model, trainer, columns.tolist())
    trainer._item_vectors = lambda m, cols: plain_item_vectors(m, trainer, cols).detach()
    return users, targets, columns, inverse, items


def test_the_prior_is_weight_times_the_counted_log_q_of_train_targets(tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", popularity_prior_weight=1.5)
    log_q = hand_log_q(list(trainer.train_dataset["target"]), len(trainer.items))
    assert_close_at_scale(trainer.prior_bias, 1.5 * log_q)
    assert (
        build_trainer(tokenizer, synthetic_data, tmp_path / "paper").prior_bias is None
    )  # weight 0: the paper


def test_at_weight_one_the_prior_and_the_logq_correction_cancel_into_the_papers_item_loss(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(
        tokenizer, synthetic_data, tmp_path / "out", popularity_prior_weight=1.0, item_logq_correction=True
    )
    users, targets, columns, _, _ = item_loss_setup(trainer)
    assert torch.equal(trainer._column_bias(columns, len(columns), 0), torch.zeros(len(columns)))
    both = trainer._item_loss(trainer.model, users, targets, None, None)
    trainer.prior_bias, trainer.item_log_q = None, None  # the paper's loss
    paper = trainer._item_loss(trainer.model, users, targets, None, None)
    assert both.item() == paper.item()


def test_with_the_correction_each_column_adds_weight_minus_one_log_q(tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(
        tokenizer, synthetic_data, tmp_path / "out", popularity_prior_weight=2.0, item_logq_correction=True
    )
    users, targets, columns, inverse, items = item_loss_setup(trainer)
    log_q = hand_log_q(list(trainer.train_dataset["target"]), len(trainer.items))
    tau = trainer.args.similarity_temperature
    with torch.no_grad():
        loss = trainer._item_loss(trainer.model, users, targets, None, None)
        cos = F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T
        expected = F.cross_entropy(cos / tau + (2.0 - 1.0) * log_q[columns], inverse)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.prior_bias = None  # without the prior the column would add -log q: another loss
    with torch.no_grad():
        assert trainer._item_loss(trainer.model, users, targets, None, None).item() != pytest.approx(
            loss.item(), rel=1e-3
        )


def test_without_the_correction_the_item_surrogate_trains_the_score_with_the_prior(
    tokenizer, synthetic_data, tmp_path
):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", popularity_prior_weight=0.5)
    users, targets, columns, inverse, items = item_loss_setup(trainer)
    advantages, mask = torch.tensor(ADVANTAGES), torch.tensor(RELABEL)
    trainer._item_loss(trainer.model, users, targets, advantages, mask).backward()
    # By hand: at ratio 1 the clipped surrogate's gradient is that of -mean(A log p) over the relabelled rollouts,
    # p the in-batch softmax of cos / tau + 0.5 log q.
    log_q = hand_log_q(list(trainer.train_dataset["target"]), len(trainer.items))
    fresh = users.detach().clone().requires_grad_(True)
    cos = F.normalize(fresh, dim=-1) @ F.normalize(items, dim=-1).T
    log_p = torch.log_softmax(cos / trainer.args.similarity_temperature + 0.5 * log_q[columns], dim=-1)
    (-(advantages * log_p[torch.arange(4), inverse])[mask].mean()).backward()
    assert_close_at_scale(users.grad, fresh.grad)


def popularity_rank_bounds(counts: Counter, target: int, history, num_items: int) -> tuple[int, int]:
    """The target's rank when the prior decides it: after every more popular item, among the equally popular."""
    others = [i for i in range(num_items) if i != target and i not in set(history)]
    above = sum(counts[i] > counts[target] for i in others)
    level = sum(counts[i] == counts[target] for i in others)
    return 1 + above, 1 + above + level


def test_rewards_and_evaluation_rank_with_the_prior(tokenizer, synthetic_data, tmp_path):
    # A weight so large that log q decides every rank (|cos / tau| <= 50; distinct counts differ in log q by >=
    # 0.01, times 1e5), so each rank lies within the popularity order's bounds, computed here from the counts.
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        popularity_prior_weight=1e5,
        per_device_train_batch_size=8,
        num_generations=4,
    )
    counts, num_items = Counter(trainer.train_dataset["target"]), len(trainer.items)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    inputs = [dict(row) for row in rows for _ in range(4)]
    trainer._generate_and_score_completions(inputs)
    ndcg = trainer._last_rewards_per_func[:, 0]
    ranks = torch.round(2 ** (1 / ndcg) - 1).long().tolist()  # NDCG = 1 / log2(rank + 1), rank <= 1000
    for row, rank in zip(inputs, ranks, strict=True):
        low, high = popularity_rank_bounds(counts, row["target"], row["history"], num_items)
        assert low <= rank <= high
    trainer.ranking_evaluation({"valid": trainer.eval_rows})
    evaluated = trainer.last_per_user["valid"]["rank"]
    for row, rank in zip(trainer.eval_rows, evaluated, strict=True):
        low, high = popularity_rank_bounds(counts, row["target"], row["history"], num_items)
        assert low <= rank <= high
    bounds = [popularity_rank_bounds(counts, r["target"], r["history"], num_items) for r in trainer.eval_rows]
    assert any(
        high - low < num_items / 2 for low, high in bounds
    )  # the bounds are tight enough to mean something


@pytest.fixture(scope="module")
def prior_run(tiny_run, tmp_path_factory):
    """A run trained with the prior at weight 1: the session's tiny run, copied (the commands below may write
    into the folder they score)."""
    out = tmp_path_factory.mktemp("prior-run") / "run"
    shutil.copytree(tiny_run, out)
    return out


def evaluated_ranks(model, data, *extra) -> tuple[list[int], dict]:
    doc = evaluate.main(["--model", str(model), "--data", str(data), "--max-users", "8", *FAST, *extra])
    return doc["per_user"]["test"]["rank"], doc["scoring"]


def test_a_run_stores_its_prior_and_recipes_evaluate_scores_with_it(
    prior_run, tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    from datasets import load_from_disk

    monkeypatch.chdir(tmp_path)  # the traces go to the working folder
    monkeypatch.setenv("RECPO_CACHE", str(tmp_path / "cache"))
    saved = torch.load(prior_run / "score_prior.pt", weights_only=True)
    data = load_from_disk(str(synthetic_data))
    assert saved["weight"] == 1.0
    assert_close_at_scale(saved["log_q"], hand_log_q(list(data["train"]["target"]), len(data["items"])))

    own, scoring = evaluated_ranks(prior_run, synthetic_data)
    assert scoring["popularity_prior_weight"] == 1.0 and "the run's own" in scoring["popularity_prior"]
    from_data, _ = evaluated_ranks(prior_run, synthetic_data, "--popularity-prior-weight", "1")
    assert from_data == own  # the same train split: the same log q
    without, scoring = evaluated_ranks(prior_run, synthetic_data, "--popularity-prior-weight", "0")
    assert scoring["popularity_prior_weight"] == 0.0 and without != own
    # Any model scored with the run's prior: the untrained one, as the run scores.
    untrained, scoring = evaluated_ranks(tiny_model_dir, synthetic_data, "--prior-from", str(prior_run))
    assert scoring["popularity_prior_weight"] == 1.0
    plain, _ = evaluated_ranks(tiny_model_dir, synthetic_data)
    assert untrained != plain


def test_prior_errors_name_what_is_wrong(prior_run, tiny_model_dir, synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no score_prior.pt here"):
        evaluated_ranks(tiny_model_dir, synthetic_data, "--prior-from", str(tiny_model_dir))
    bad = tmp_path / "score_prior.pt"
    torch.save({"weight": 1.0, "log_q": torch.zeros(3)}, bad)
    with pytest.raises(SystemExit, match="has 3 items"):
        evaluated_ranks(tiny_model_dir, synthetic_data, "--prior-from", str(bad))


def test_recipes_recommend_scores_with_the_runs_prior(
    prior_run, synthetic_data, tmp_path, monkeypatch, capsys
):
    from datasets import load_from_disk

    monkeypatch.setenv("RECPO_CACHE", str(tmp_path / "cache"))
    data = load_from_disk(str(synthetic_data))
    titles, counts = list(data["items"]["title"]), Counter(data["train"]["target"])
    base = [
        "--model",
        str(prior_run),
        "--data",
        str(synthetic_data),
        "--history",
        titles[0],
        "--k",
        "3",
        *FAST,
    ]
    recommend.main(base)
    assert "score = cos / tau + 1 log q" in capsys.readouterr().out
    # With a weight that decides the order, the top 3 are the three most popular items outside the history.
    rec = recommend.main([*base, "--popularity-prior-weight", "1e5"])
    popular = sorted((i for i in range(len(titles)) if i != 0), key=lambda i: -counts[i])
    assert [counts[i] for i in rec.items] == [counts[i] for i in popular[:3]]
