"""Ranking evaluation shared by the trainer and `python -m recipes.evaluate`.

Greedy reasoning closed by the answer marker, the user vector at the marker, full-catalog cosine
scores, the user's history masked, and Hit@K / NDCG@K from `rewards.ranking` (one definition for
rewards, evaluation and baselines).
"""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from recipes.decoding import reason_and_encode
from recipes.vectors import (
    MarkerCloser,
    encode_sequences,
    encode_shared_prefix,
    inference,
    left_pad,
    unwrap,
)
from rewards.ranking import history_mask, ranking_metrics, target_rank


def sample_indices(count: int, limit: int | None, seed: int) -> list[int]:
    """All of range(count), or a seeded random subset of `limit` in order: the evaluation users.

    The trainer, `recipes.evaluate` and the baselines draw with this, so the same seed and limit
    score the same users everywhere.
    """
    indices = list(range(count))
    if limit is not None and limit < count:
        indices = sorted(random.Random(seed).sample(indices, limit))
    return indices


_SYSTEM_ROLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, answer)


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template accepts a system turn (Gemma-2's raises).

    The answer is kept per tokenizer and template: the renderers ask for every prompt of a catalog of thousands.
    """
    template = str(tokenizer.chat_template)
    known = _SYSTEM_ROLE.get(tokenizer)
    if known is None or known[0] != template:
        known = (template, _probe_system_role(tokenizer))
        _SYSTEM_ROLE[tokenizer] = known
    return known[1]


def _probe_system_role(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False
        )
    except Exception:  # the template raises its own error type (jinja's TemplateError, ValueError...)
        return False
    return True


def fold_system_turn(messages: list[dict]) -> list[dict]:
    """Move a leading system message into the first user message, for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": system}, *rest]


def messages_for(tokenizer, messages: list[dict]) -> list[dict]:
    """The stored messages as this tokenizer's template can render them: the system turn folded into the user
    turn where the template rejects one, unchanged otherwise. Every rendering of a stored prompt (the renderers
    below, the trainer's rollouts) goes through here."""
    return messages if supports_system_role(tokenizer) else fold_system_turn(messages)


def render_user_prompt(tokenizer, messages: list[dict], reasoning: bool, marker: str) -> list[int]:
    """Token ids of a user prompt: ready for reasoning, or (no-reasoning) with the marker pre-filled."""
    messages = messages_for(tokenizer, messages)
    if reasoning:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": marker}], tokenize=False, continue_final_message=True
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_item_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of an item prompt; its assistant turn is pre-filled with the marker and left open."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("An item prompt must end with the assistant turn pre-filled with the answer marker")
    text = tokenizer.apply_chat_template(
        messages_for(tokenizer, messages), tokenize=False, continue_final_message=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def stop_at_marker(model: nn.Module, tokenizer, marker: str) -> Iterator[None]:
    """Make `model.generate` stop at the marker text.

    transformers' stop strings need the tokenizer passed to `generate`, which TRL's generation call does
    not do; binding it on the model instance for the duration keeps TRL's generation path untouched.
    """
    target = unwrap_for_generate(model)
    original = target.__dict__.get("generate")
    bound = target.generate

    def generate(*args, **kwargs):
        kwargs.setdefault("tokenizer", tokenizer)
        config = kwargs.get("generation_config")
        if config is not None and marker not in (config.stop_strings or []):
            config = config.__class__.from_dict(config.to_dict())
            config.stop_strings = [*(config.stop_strings or []), marker]
            kwargs["generation_config"] = config
        elif config is None:
            kwargs.setdefault("stop_strings", [marker])
        return bound(*args, **kwargs)

    target.generate = generate
    try:
        yield
    finally:
        if original is None:
            del target.generate
        else:
            target.generate = original


def unwrap_for_generate(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def greedy_reasoning(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    closer: MarkerCloser,
    max_new_tokens: int,
    batch_size: int = 32,
    progress: str | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy reasoning for each prompt, cut after the marker (appended when missing)."""
    device = next(model.parameters()).device
    generator = unwrap_for_generate(model)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        stop_strings=[closer.marker],
    )
    completions: list[list[int]] = [[] for _ in prompts]
    found: list[bool] = [False for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with inference(generator):
        for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
            ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
            out = generator.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer
            )
            for row, index in enumerate(chunk):
                generated = out[row, ids.size(1) :].tolist()
                if eos in generated:
                    generated = generated[: generated.index(eos) + 1]
                completions[index], found[index] = closer.close(generated)
    return completions, found


def cosine_scores(
    user_vecs: torch.Tensor, item_vecs: torch.Tensor, tau: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """s(u, i) = cos(h_u, h_i) / tau + prior(i) over the catalog, in float32. (users, items)

    `prior` `(items,)` is the popularity prior's lambda * log q (`rewards.prior.ScorePrior.bias`); None is the
    paper's score. Every ranking (rewards, evaluation, recommendations) scores through here.
    """
    users = F.normalize(user_vecs.float(), dim=-1)
    items = F.normalize(item_vecs.float().to(users.device), dim=-1)
    scores = users @ items.T / tau
    if prior is not None:
        scores = scores + prior.float().to(scores.device).unsqueeze(0)
    return scores


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows, in O(n d): |sum of unit rows|^2 = n + sum over pairs."""
    n = vectors.size(0)
    if n < 2:
        return float("nan")
    total = F.normalize(vectors.float(), dim=-1).sum(dim=0)
    return ((total @ total - n) / (n * (n - 1))).item()


COLLAPSED_SPREAD = 0.1  # score units (nats of the softmax): below it the cosine term hardly reorders anything


def score_spread(vectors: torch.Tensor, tau: float, rows: int = 256, chunk: int = 64) -> float:
    """How far the cosine term spreads an item's scores: the standard deviation over the catalog of cos(v_i, v_j)
    / tau, averaged over up to `rows` evenly spaced items i, in the score's own units (a difference of 1 is a
    factor e in the softmax). Item vectors stand in for user vectors, which live in the same space. On MovieLens at
    tau 0.02 the untrained SmolLM2 reads 0.42, runs that learned 0.33-0.67, warm-ups that collapsed 0.03-0.08
    (reports/README.md). O(rows N d)."""
    n = vectors.size(0)
    if n < 2:
        return float("nan")
    unit = F.normalize(vectors.float(), dim=-1)
    picked = torch.linspace(0, n - 1, steps=min(rows, n)).round().long().unique()
    spreads = [_cosine_spreads(unit[part], unit) for part in picked.split(chunk)]
    return (torch.cat(spreads).mean() / tau).item()


def batch_score_spread(user_vecs: torch.Tensor, item_vecs: torch.Tensor, tau: float) -> float:
    """score_spread of one training batch: the standard deviation of cos(u, v) / tau over the batch's items,
    averaged over its users (R, d) x (B, d); the same units and the same collapse threshold as the index's."""
    if item_vecs.size(0) < 2:
        return float("nan")
    with torch.no_grad():
        return (_cosine_spreads(user_vecs, item_vecs).mean() / tau).item()


def _cosine_spreads(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Each row's standard deviation of its cosines to the columns: (R, d) x (C, d) -> (R,)."""
    return (F.normalize(rows.float(), dim=-1) @ F.normalize(columns.float(), dim=-1).T).std(dim=1)


def collapse_warning(spread: float, prior: torch.Tensor | None) -> str | None:
    """What to tell the user when the cosine term no longer ranks (score_spread below COLLAPSED_SPREAD), or None."""
    if not spread < COLLAPSED_SPREAD:  # also None for nan
        return None
    if prior is not None and prior.numel() > 1:
        ranked = f"the popularity prior (spread {prior.float().std().item():.2f}) ranks on its own: popularity's ranking"
    else:
        ranked = "every item scores about the same"
    return (
        f"The item vectors have collapsed: the cosine term spreads the scores by {spread:.3f} "
        f"(standard deviation over the catalog, in score units), so {ranked}. The no-reasoning item warm-up falls "
        "into this on some data orders (2 of 5 seeds tried; reports/README.md, 'What decides the collapse'); "
        "try another --seed, or --warmup_restarts 2 to have the warm-up start over when it collapses."
    )


@dataclass
class RankingResult:
    ranks: torch.Tensor  # (users,) 1-based rank of the target
    top_items: torch.Tensor  # (users, k) best-scored non-history items
    top_scores: torch.Tensor  # (users, k)
    completions: list[str] = field(default_factory=list)
    marker_found: list[bool] = field(default_factory=list)

    def metrics(self, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
        return ranking_metrics(self.ranks, ks=tuple(ks))


def rank_targets(
    scores: torch.Tensor, targets: Sequence[int], histories: Sequence[Sequence[int]], top_k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks of the targets and the top-k items with the history masked. scores: (users, items)"""
    exclude = history_mask(histories, scores.size(1), device=scores.device)
    target = torch.as_tensor(list(targets), dtype=torch.long, device=scores.device)
    ranks = target_rank(scores, target, exclude=exclude)
    k = min(top_k, scores.size(1))
    masked = scores.masked_fill(exclude, float("-inf"))
    masked[torch.arange(len(target), device=scores.device), target] = scores[
        torch.arange(len(target), device=scores.device), target
    ]
    top_scores, top_items = masked.topk(k, dim=1)
    return ranks, top_items, top_scores


def build_item_index(
    model: nn.Module,
    item_prompts: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    progress: str | None = "item index",
    accelerator=None,
) -> torch.Tensor:
    """Vectors of every catalog item, (items, d); shared across processes when an accelerator is given."""
    with inference(model):
        if accelerator is None or accelerator.num_processes == 1:
            return encode_shared_prefix(model, item_prompts, pad_id, batch_size, progress).float()
        world, rank = accelerator.num_processes, accelerator.process_index
        mine = list(range(rank, len(item_prompts), world))
        per_rank = -(-len(item_prompts) // world)
        local = encode_shared_prefix(
            model, [item_prompts[i] for i in mine], pad_id, batch_size, progress
        ).float()
        padded = local.new_zeros((per_rank, local.size(1)))
        padded[: local.size(0)] = local
        gathered = accelerator.gather(padded).view(world, per_rank, -1)  # (world, per_rank, d)
        index = local.new_empty((len(item_prompts), local.size(1)))
        for r in range(world):
            rows = list(range(r, len(item_prompts), world))
            index[rows] = gathered[r, : len(rows)]
        return index


def evaluate_users(
    model: nn.Module,
    tokenizer,
    rows: Sequence[dict],
    item_index: torch.Tensor,
    closer: MarkerCloser,
    *,
    reasoning: bool = True,
    tau: float = 0.02,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    top_k: int = 10,
    progress: str | None = None,
    prior: torch.Tensor | None = None,
) -> RankingResult:
    """Rank the full catalog for each sample row (`prompt`, `history`, `target`); `prior` as in `cosine_scores`."""
    prompts = [render_user_prompt(tokenizer, row["prompt"], reasoning, closer.marker) for row in rows]
    with inference(model):
        if reasoning:
            user_vecs, completions, found = reason_and_encode(
                model, tokenizer, prompts, closer, max_new_tokens, batch_size=batch_size, progress=progress
            )
        else:
            user_vecs = encode_sequences(model, prompts, tokenizer.pad_token_id, batch_size, progress)
            completions, found = [[] for _ in prompts], [True for _ in prompts]
    scores = cosine_scores(user_vecs, item_index, tau, prior)  # (users, items)
    ranks, top_items, top_scores = rank_targets(
        scores, [row["target"] for row in rows], [row["history"] for row in rows], top_k
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return RankingResult(ranks.cpu(), top_items.cpu(), top_scores.cpu(), texts, found)


__all__ = [
    "RankingResult",
    "build_item_index",
    "cosine_scores",
    "evaluate_users",
    "greedy_reasoning",
    "rank_targets",
    "fold_system_turn",
    "messages_for",
    "render_item_prompt",
    "render_user_prompt",
    "sample_indices",
    "stop_at_marker",
    "supports_system_role",
    "unwrap",
]
