"""Token log-probs of rollouts whose prompts repeat: each distinct prompt runs through the model once.

A RecPO batch holds G rollouts per user, and a prompt is most of each rollout's tokens (on the CPU
default about 180 of 200). TRL's forward runs every rollout's prompt again; here each distinct prompt,
minus its last token, runs once (`recipes.vectors.prefill`, which also runs the instruction every prompt
starts with once), its keys and values are copied to the rollouts that share it, and only
[last prompt token, completion...] runs per rollout, through the model's own forward with TRL's fused
LM head. Gradient flows through the copies, so the loss and its gradient equal TRL's (to float rounding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from recipes.vectors import Prefill, capture_final_hidden, prefill, unwrap


def prefill_recomputed(model: nn.Module, prompts: list[list[int]], pad_id: int) -> Prefill:
    """`prefill` whose activations are not kept for the backward pass but recomputed there.

    Only the keys and values leave the checkpointed region (they are what the completions attend to), so the
    memory held until the backward pass is the cache, not every layer's intermediate values.
    """
    meta: dict = {}

    def run() -> tuple[torch.Tensor, ...]:
        state = prefill(model, prompts, pad_id)
        meta.update(mask=state.mask, next_position=state.next_position, cache_kw=state.cache_kw)
        return tuple(t for layer in state.cache.layers for t in (layer.keys, layer.values))

    tensors = checkpoint(run, use_reentrant=False)
    pairs = list(zip(tensors[0::2], tensors[1::2], strict=True))
    cache = DynamicCache(ddp_cache_data=pairs, config=unwrap(model).config)
    return Prefill(cache, meta["mask"], meta["next_position"], None, meta["cache_kw"])


def shared_prompt_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    pad_id: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    recompute_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs and entropies of the completions, and the final hidden state at each one's last token.

    input_ids and attention_mask are `(B, P + C)`: left-padded prompts then right-padded completions, as TRL
    builds them; `model` carries TRL's fused LM head. Returns log-probs `(B, C)`, entropies `(B, C)` (None if
    the head does not compute them) and hidden states `(B, d)` at each completion's last real token.
    With `recompute_prompts`, the prompts' forward is recomputed in the backward pass instead of keeping its
    activations (`prefill_recomputed`).
    """
    prompt_len = input_ids.size(1) - logits_to_keep
    prompt_ids, prompt_mask = input_ids[:, :prompt_len], attention_mask[:, :prompt_len]
    completion_ids, completion_mask = input_ids[:, prompt_len:], attention_mask[:, prompt_len:]
    prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask, strict=True)]
    rows = input_ids.size(0)
    with autocast():
        run = prefill_recomputed if recompute_prompts and torch.is_grad_enabled() else prefill
        state = run(model, [p[:-1] for p in prompts], pad_id)
        last = torch.as_tensor([p[-1] for p in prompts], dtype=input_ids.dtype, device=input_ids.device)
        tail = torch.cat([last.unsqueeze(1), completion_ids], dim=1)  # (B, 1 + C)
        tail_mask = torch.cat([completion_mask.new_ones((rows, 1)), completion_mask], dim=1)
        positions = state.next_position.unsqueeze(1) + torch.arange(tail.size(1), device=tail.device)
        labels = tail.masked_fill(tail_mask == 0, -100)  # the fused head scores labels[:, 1:], the completion
        with capture_final_hidden(model) as capture:
            out = model(
                input_ids=tail,
                attention_mask=torch.cat([state.mask, tail_mask], dim=1),
                position_ids=positions,
                labels=labels,
                fused_lm_head=True,
                **{state.cache_kw: state.cache},
            )
    hidden = capture.hidden  # (B, 1 + C, d): column k + 1 holds completion token k
    lengths = completion_mask.sum(dim=1)
    at_end = hidden[torch.arange(rows, device=hidden.device), lengths]
    return out.log_probs, out.entropy, at_end
