"""Full-catalog ranking of recipes/evaluation.py, checked against hand numbers and a plain re-derivation.

The re-derivation shares no code with what it checks: vectors from the model's own forward with
`output_hidden_states=True`, one sequence at a time (no padding, no shared prefix, no cache), greedy reasoning
one token at a time from full forwards, cosines from x / |x|, ranks counted in a loop with the history
masked and ties against the target. The trainer tests use the same helpers.

Ranks are discrete: two float paths that agree to rounding can still order a near-tie differently on another
CPU, so a rank is compared exactly where the target's score stands clear of every other candidate's, and
within the few ranks that rounding allows elsewhere (`rank_window`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from datasets import load_from_disk

from recipes.evaluation import cosine_scores, evaluate_users
from recipes.vectors import MarkerCloser
from tests.numerics import assert_close_at_scale

MARKER = "<answer>"
# Two computations of a score (the code's, batched and cached, and the plain one here) differ by float rounding:
# about 4e-7 of the row's largest |score| on this machine (2e-5 at scores near 48). A rank is compared exactly
# where no other candidate lies within SEPARATION of that scale of the target, 50 times the rounding, and
# within the window of ranks that rounding allows elsewhere. The tiny model's catalog is crowded (cosines
# 0.92-0.96, neighbouring scores about 4e-4 of the scale apart), so a wider margin would leave few to compare.
SEPARATION = 2e-5
# Greedy decoding is compared where the best logit beats the second by more than this fraction of the largest
# |logit| at every step: a closer pair may decode the other way on another path (or CPU).
GREEDY_GAP = 1e-4


# ----------------------------------------------------------------------------- plain re-derivation


@torch.no_grad()
def plain_vectors(model, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final hidden state (after the final norm) at the last token of each sequence, one plain forward each. (n, d)"""
    was_training = model.training
    model.eval()
    try:
        vectors = [
            model(
                input_ids=torch.tensor([list(ids)]), output_hidden_states=True, logits_to_keep=1
            ).hidden_states[-1][0, -1]
            for ids in sequences
        ]
    finally:
        model.train(was_training)
    return torch.stack(vectors).double()


def hand_scores(users: torch.Tensor, items: torch.Tensor, tau: float) -> list[list[float]]:
    """cos(u, i) / tau for every pair, from vectors divided by their own norms. (users, items)"""
    unit_users = [u / u.norm() for u in users.double()]
    unit_items = [i / i.norm() for i in items.double()]
    return [[float(u @ i) / tau for i in unit_items] for u in unit_users]


def rank_window(row: Sequence[float], target: int, history: Sequence[int]) -> tuple[int, int]:
    """The best and the worst rank the target can take when any score may be off by SEPARATION of the row's
    largest |score|: 1 + the non-history items, other than the target, scoring above it (best) or at least as
    high (worst: ties count against the target). Equal where no other candidate scores that close to it."""
    margin = SEPARATION * max(abs(s) for s in row)
    rivals = [s for i, s in enumerate(row) if i != target and i not in history]
    best = 1 + sum(1 for s in rivals if s > row[target] + margin)
    return best, 1 + sum(1 for s in rivals if s >= row[target] - margin)


def hand_ndcg(rank: int, k: int = 1000) -> float:
    return 1 / math.log2(rank + 1) if rank <= k else 0.0


def hand_softmax(row: Sequence[float], target: int, history: Sequence[int]) -> float:
    """exp(s_target) / sum of exp(s) over the non-history items and the target."""
    kept = [s for i, s in enumerate(row) if i == target or i not in history]
    top = max(kept)
    return math.exp(row[target] - top) / sum(math.exp(s - top) for s in kept)


@torch.no_grad()
def plain_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy reasoning of an eval-mode model from full forwards, closed as DESIGN.md says: cut after the marker the model writes;
    at EOS or after `max_new_tokens` tokens, the marker appended. Also returns the smallest gap between the
    best and the second-best logit over the steps: a near-tie there may decode differently elsewhere."""
    marker_ids = tokenizer.encode(MARKER, add_special_tokens=False)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    generated: list[int] = []
    smallest_gap = math.inf
    while len(generated) < max_new_tokens:
        logits = model(input_ids=torch.tensor([prompt + generated]), logits_to_keep=1).logits[0, -1].double()
        best = logits.topk(2).values
        smallest_gap = min(smallest_gap, float(best[0] - best[1]) / float(logits.abs().max()))
        token = int(logits.argmax())
        if token in stops:
            break
        generated.append(token)
        if MARKER in tokenizer.decode(generated):
            return generated, smallest_gap
    return generated + marker_ids, smallest_gap


def chat_ids(tokenizer, messages: list[dict], reasoning: bool) -> list[int]:
    """A user prompt in the model's chat template: open for reasoning, or with the marker as the answer."""
    if reasoning:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        answer = {"role": "assistant", "content": MARKER}
        text = tokenizer.apply_chat_template([*messages, answer], tokenize=False, continue_final_message=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- cosine scores by hand


def test_cosine_scores_are_cosines_over_tau():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 0.0]])
    r = math.sqrt(0.5)  # cos 45 degrees
    expected = torch.tensor(
        [
            [1.0, 0.0, r, -1.0],
            [0.0, 1.0, r, 0.0],
            [r, r, 1.0, -r],
        ]
    )
    scores = cosine_scores(users, items, tau=0.5)
    assert scores.dtype == torch.float32
    assert_close_at_scale(scores, expected / 0.5, rel=1e-6)
    assert_close_at_scale(
        cosine_scores(users.bfloat16(), items.bfloat16(), tau=0.5), expected / 0.5, rel=1e-6
    )


# ----------------------------------------------------------------------------- evaluate_users, re-derived


@pytest.mark.parametrize("reasoning", [False, True])
def test_evaluation_ranks_equal_a_plain_re_derivation(tiny_model, tokenizer, synthetic_data, reasoning):
    data = load_from_disk(str(synthetic_data))
    rows = [data["test"][i] for i in range(16)]
    item_prompts = [
        tokenizer(
            tokenizer.apply_chat_template(p, tokenize=False, continue_final_message=True),
            add_special_tokens=False,
        )["input_ids"]
        for p in data["items"]["prompt"]
    ]
    items = plain_vectors(tiny_model, item_prompts)
    tau, max_new_tokens = 0.02, 6
    result = evaluate_users(
        tiny_model,
        tokenizer,
        rows,
        items.float(),
        MarkerCloser(tokenizer, MARKER),
        reasoning=reasoning,
        tau=tau,
        max_new_tokens=max_new_tokens,
        batch_size=3,  # batches of different lengths: left padding inside the evaluation
        top_k=5,
    )

    prompts = [chat_ids(tokenizer, row["prompt"], reasoning) for row in rows]
    clear = list(range(len(rows)))  # users whose greedy decoding has no near-tie
    if reasoning:
        decoded = [plain_greedy(tiny_model, tokenizer, p, max_new_tokens) for p in prompts]
        clear = [u for u in clear if decoded[u][1] > GREEDY_GAP]
        assert len(clear) >= 12
        for u in clear:
            assert result.completions[u] == tokenizer.decode(decoded[u][0], skip_special_tokens=True)
        sequences = [p + completion for p, (completion, _) in zip(prompts, decoded, strict=True)]
    else:
        assert result.completions == [""] * len(rows) and all(result.marker_found)
        sequences = prompts
    scores = hand_scores(plain_vectors(tiny_model, sequences), items, tau)

    exact = 0
    for u in clear:
        row, target, history = scores[u], rows[u]["target"], rows[u]["history"]
        # The top 5: the best non-history items (the target kept), scores equal to the hand scores.
        kept = sorted((s for i, s in enumerate(row) if i == target or i not in history), reverse=True)
        assert_close_at_scale(result.top_scores[u], torch.tensor(kept[:5]), name=f"user {u} top scores")
        listed = torch.tensor([row[i] for i in result.top_items[u].tolist()])
        assert_close_at_scale(listed, torch.tensor(kept[:5]), name=f"user {u} top items")
        best, worst = rank_window(row, target, history)
        assert best <= int(result.ranks[u]) <= worst, f"user {u}: rank {int(result.ranks[u])}"
        exact += best == worst
    assert exact >= 12, f"only {exact} of {len(rows)} users have a clearly separated target"
    assert len({int(r) for r in result.ranks}) > 1  # ranks differ between users: not one constant
