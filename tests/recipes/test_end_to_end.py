"""End to end: the real embedded default model (SmolLM2-135M-Instruct) on the real MovieLens-100K data.

Two RecPO steps of 2 users x 2 rollouts and a final evaluation on a few valid users, through
`recipes.recpo.main` as `make train` runs it. The catalog (1682 movies) is encoded by the real model at
the first step and again for the evaluation, which is most of the time this test takes: about 11 minutes
on the shared 2-core box, so it is marked slow (`make test-slow`).
"""

from __future__ import annotations

import json
import math

import pytest

from recipes import recpo
from recipes.modeling import EMBEDDED_MODEL
from tests.recipes.conftest import recpo_args

METRICS = {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    from data_prep.__main__ import main as data_prep

    out = tmp_path_factory.mktemp("ml-100k") / "data"
    assert data_prep(["movielens", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_recpo_steps_on_the_embedded_model_and_movielens(movielens, tmp_path):
    out = tmp_path / "run"
    args = recpo_args(
        out,
        EMBEDDED_MODEL,
        movielens,
        max_completion_length=12,
        max_eval_users=4,
        evaluate_test=False,
        save_strategy="steps",
        save_steps=2,
        item_batch_size=64,
        learning_rate=1e-5,
    )
    results = recpo.main(*args)

    written = json.loads((out / "results.json").read_text())
    assert written == results
    assert set(written) == {"valid", "per_user"} and set(written["valid"]) == METRICS
    assert len(written["per_user"]["valid"]["rank"]) == 4
    assert all(0.0 <= v <= 1.0 for v in written["valid"].values())
    index = out / "item_index.pt"
    assert index.is_file()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2]
    for entry in train_logs:
        for key in ("loss", "item_loss", "reward", "rewards/ndcg/mean", "rewards/softmax/mean"):
            assert math.isfinite(entry[key]), key
        assert 0.0 <= entry["rewards/ndcg/mean"] <= 1.0
        assert 0.0 < entry["rewards/softmax/mean"] < 1.0
