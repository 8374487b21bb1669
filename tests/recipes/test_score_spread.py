"""recipes.evaluation.score_spread and collapse_warning: how far the cosine term spreads the scores, and the
warning a run gets when its item vectors have collapsed (every score then equals the prior's)."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.evaluation import COLLAPSED_SPREAD, batch_score_spread, collapse_warning, score_spread


def plain_spread(vectors: torch.Tensor, tau: float, rows: list[int]) -> float:
    """The definition, written out: for each chosen item, the standard deviation of its cosines to every item."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    spreads = []
    for i in rows:
        cosines = torch.stack([unit[i] @ unit[j] for j in range(len(unit))])
        spreads.append(cosines.std().item())
    return sum(spreads) / len(spreads) / tau


def test_score_spread_is_the_mean_standard_deviation_of_each_rows_cosines_over_tau():
    vectors = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) + 1.0
    expected = plain_spread(vectors, 0.02, list(range(40)))
    assert score_spread(vectors, 0.02) == pytest.approx(expected, rel=1e-5)
    assert score_spread(vectors, 0.04) == pytest.approx(expected / 2, rel=1e-5)  # in score units: / tau
    assert score_spread(3.0 * vectors, 0.02) == pytest.approx(expected, rel=1e-5)  # cosines ignore the length
    assert score_spread(vectors, 0.02, rows=40, chunk=7) == pytest.approx(expected, rel=1e-5)  # chunking


def test_score_spread_on_a_large_catalog_reads_evenly_spaced_rows():
    vectors = torch.randn(101, 6, generator=torch.Generator().manual_seed(1))
    # 5 rows of 101: items 0, 25, 50, 75, 100
    assert score_spread(vectors, 0.1, rows=5) == pytest.approx(
        plain_spread(vectors, 0.1, [0, 25, 50, 75, 100]), rel=1e-5
    )


def test_hand_computed_spread_of_three_vectors():
    # Cosines of row 0 to rows (0, 1, 2): 1, 0, 0 (sample sd 0.5774); row 1: 0, 1, 0.6; row 2: 0, 0.6, 1.
    vectors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
    sds = [torch.tensor(row).std().item() for row in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.6], [0.0, 0.6, 1.0])]
    assert score_spread(vectors, 1.0) == pytest.approx(sum(sds) / 3, rel=1e-5)
    assert sds[0] == pytest.approx(0.57735, abs=1e-5)


def test_collapsed_vectors_spread_nothing_and_warn():
    base = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    noise = 1e-4 * torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    collapsed = base + noise  # every cosine ~1: the state a collapsed warm-up leaves
    spread = score_spread(collapsed, 0.02)
    assert spread < COLLAPSED_SPREAD
    prior = torch.log(torch.linspace(0.001, 0.05, 50))
    message = collapse_warning(spread, prior)
    assert (
        message is not None and "popularity" in message and f"{spread:.3f}" in message and "--seed" in message
    )
    without = collapse_warning(spread, None)
    assert without is not None and "about the same" in without


def test_spread_vectors_do_not_warn():
    vectors = torch.randn(50, 16, generator=torch.Generator().manual_seed(4))
    spread = score_spread(vectors, 0.02)
    assert spread > COLLAPSED_SPREAD
    assert collapse_warning(spread, torch.zeros(50)) is None
    assert collapse_warning(math.nan, None) is None  # a one-item catalog has no spread to judge
    assert math.isnan(score_spread(vectors[:1], 0.02))


def test_batch_score_spread_is_the_mean_over_users_of_the_std_of_their_cosines_over_tau():
    gen = torch.Generator().manual_seed(1)
    users, items = torch.randn(3, 6, generator=gen), torch.randn(5, 6, generator=gen)
    per_user = []
    for u in users:
        cosines = torch.stack([(u @ v) / (u.norm() * v.norm()) for v in items])
        per_user.append(cosines.std().item())
    expected = sum(per_user) / len(per_user) / 0.02
    assert batch_score_spread(users, items, 0.02) == pytest.approx(expected, rel=1e-5)
    assert batch_score_spread(2.0 * users, items, 0.01) == pytest.approx(2 * expected, rel=1e-5)
    # every item in one direction: the collapse the warm-up restarts on
    same = items[:1].expand(5, -1)
    assert batch_score_spread(users, same, 0.02) < 1e-4 < COLLAPSED_SPREAD
    assert math.isnan(batch_score_spread(users, items[:1], 0.02))  # one item: no spread to measure
