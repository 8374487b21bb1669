"""Reasoning decoded token by token, with the user vector read inside the same loop.

`reason_and_encode` serves evaluation (greedy) and training rollouts (sampled). It prefills each distinct
prompt once (the G rollouts of a user share one prefill) and a prefix common to every prompt once per
batch (`recipes.vectors.prefill`), then decodes. Because the loop feeds the marker's last token like any
other, the hidden state there, the user vector, comes out of the loop: nothing is run twice.

Rollouts end exactly as `MarkerCloser.close` ends them: cut right after the marker the model wrote; at
EOS or at the length limit, the marker is appended.

The loop knows in advance how many tokens it may add, so each layer's keys and values get that room once, after the
prefill (`reserve_room`): a step writes its token in place instead of copying the whole cache, as transformers'
dynamic cache does at every step (`torch.cat`). On the CPU default that saves about 4% of greedy reasoning's time
(2-core AVX2 EPYC, reports/README.md); the copy it avoids grows with the rollout's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from recipes.vectors import MarkerCloser, decoder, prefill, unwrap

# GenerationConfig fields the sampling loop honours; any other field set away from its default sends rollouts
# back to transformers' generate (`sampling_warpers` says which).
_HONOURED = {
    "max_new_tokens",
    "do_sample",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "cache_implementation",
    "disable_compile",
    "stop_strings",
    "max_length",
    "transformers_version",
    "_from_model_config",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
}
_NEUTRAL = {"repetition_penalty": 1.0, "num_beams": 1, "num_return_sequences": 1}


class _RoomyLayer(DynamicLayer):
    """A dynamic cache layer whose keys and values sit at the front of buffers with room for more tokens.

    `keys` and `values` are views of the buffers' filled part, so everything that reads a `DynamicLayer` reads this
    one alike; `update` writes the new tokens into the room. Out of room, or after a batch selection, it falls back
    to the plain layer's concatenation.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device = keys.device
        rows, heads, length, dim = keys.shape
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = (
            keys.new_empty((rows, heads, length + room, dim)),
            values.new_empty((rows, values.size(1), length + room, values.size(-1))),
        )
        for buffer, states in zip(self._buffers, (keys, values), strict=True):
            buffer[:, :, :length] = states
        self.keys, self.values = (buffer[:, :, :length] for buffer in self._buffers)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.size(-2)
        end = start + key_states.size(-2)
        if self._buffers is None or end > self._buffers[0].size(-2):
            self._buffers = None  # the concatenation below leaves the buffers behind
            return super().update(key_states, value_states, *args, **kwargs)
        key_buffer, value_buffer = self._buffers
        key_buffer[:, :, start:end] = key_states
        value_buffer[:, :, start:end] = value_states
        self.keys, self.values = key_buffer[:, :, :end], value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._buffers = None
        super().batch_select_indices(indices)


def reserve_room(cache, tokens: int) -> int:
    """Give each plain dynamic layer of `cache` room for `tokens` more tokens, written in place (see `_RoomyLayer`).

    Other layer kinds (sliding windows, static or quantised caches) are left as they are. Returns how many layers
    got room. The keys and values are copied once, into the larger buffers.
    """
    layers = getattr(cache, "layers", None)
    if not layers or tokens <= 0:
        return 0
    reserved = 0
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            layers[i] = _RoomyLayer(layer.keys, layer.values, tokens)
            reserved += 1
    return reserved


class UnsupportedSampling(ValueError):
    """The generation settings need a logits processor the sampling loop does not implement."""


def sampling_warpers(config: GenerationConfig) -> LogitsProcessorList:
    """transformers' own warpers for `config`, in the order `generate` applies them when sampling.

    Raises UnsupportedSampling naming the first setting outside temperature, top-k, top-p and min-p.
    """
    for key, value in config.to_diff_dict().items():
        if key in _HONOURED or _NEUTRAL.get(key, object()) == value:
            continue
        raise UnsupportedSampling(f"generation setting {key}={value!r}")
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    return warpers


def unsupported_head(model: nn.Module) -> str | None:
    """Why the loop cannot turn this model's hidden states into its logits with the LM head alone, or None."""
    text = unwrap(model).config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) not in (None, 1.0):
            return f"the model scales its logits ({name})"
    return None


def _logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final hidden states, as the model's own forward computes them. (rows, vocab)"""
    logits = head(hidden).float()
    cap = getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def reason_and_encode(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    closer: MarkerCloser,
    max_new_tokens: int,
    *,
    batch_size: int = 32,
    warpers: LogitsProcessorList | None = None,
    eos_ids: Sequence[int] | None = None,
    progress: str | None = None,
) -> tuple[torch.Tensor, list[list[int]], list[bool]]:
    """Reason after each prompt and return (user vectors (n, d), completion ids, whether the model wrote the marker).

    Greedy when `warpers` is None; otherwise samples from softmax(warpers(logits)), as `generate` does with
    `do_sample=True`. A row stops after the token that completes the marker; at an EOS token (`eos_ids`, by
    default the tokenizer's EOS and pad) or after `max_new_tokens` tokens, the marker is fed in instead.
    Completions keep the marker and drop the EOS, as `MarkerCloser.close` does.
    """
    device = next(model.parameters()).device
    backbone = decoder(model)
    head = unwrap(model).get_output_embeddings()
    pad_id = tokenizer.pad_token_id
    if eos_ids is None:
        eos_ids = [tokenizer.eos_token_id, *([pad_id] if pad_id is not None else [])]
    eos = set(eos_ids)
    vectors: torch.Tensor | None = None
    completions: list[list[int]] = [[] for _ in prompts]
    wrote: list[bool] = [False for _ in prompts]
    # Identical prompts land in the same batch (sorted together), so they share one prefill row.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(prompts[i])))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    steps = max_new_tokens + len(closer.marker_ids) + 1  # the most tokens a row can be fed
    for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
        state = prefill(model, [prompts[i] for i in chunk], pad_id)
        cache, mask, position, hidden = state.cache, state.mask, state.next_position, state.last_hidden
        reserve_room(cache, steps)
        rows = len(chunk)
        generated: list[list[int]] = [[] for _ in range(rows)]
        texts = ["" for _ in range(rows)]
        forced: list[list[int]] = [[] for _ in range(rows)]
        closing = [False] * rows  # the token fed now completes the marker
        appended = [False] * rows  # the marker was forced in (EOS or length limit)
        done = [False] * rows
        result = torch.zeros((rows, hidden.size(-1)), dtype=hidden.dtype, device=device)
        for _ in range(steps):
            logits = _logits(model, head, hidden)  # (rows, vocab)
            if warpers is None:
                choice = logits.argmax(dim=-1).tolist()
            else:
                history = torch.as_tensor([g[-1:] or [pad_id] for g in generated], device=device)
                probs = torch.softmax(warpers(history, logits), dim=-1)
                choice = torch.multinomial(probs, num_samples=1).squeeze(1).tolist()
            feed = []
            for r in range(rows):
                if done[r]:
                    feed.append(pad_id)
                    continue
                token = forced[r].pop(0) if forced[r] else choice[r]
                if not appended[r] and token in eos:  # ended without the marker
                    forced[r], appended[r] = list(closer.marker_ids), True
                    token = forced[r].pop(0)
                generated[r].append(token)
                texts[r] += closer._piece(token)
                if forced[r] == [] and closer.marker in texts[r][-(len(closer.marker) + 64) :]:
                    closing[r] = True
                elif not appended[r] and len(generated[r]) >= max_new_tokens:
                    forced[r], appended[r] = (
                        list(closer.marker_ids),
                        True,
                    )  # length limit: close with the marker
                feed.append(token)
            step = torch.as_tensor(feed, device=device).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
            out = backbone(
                input_ids=step,
                attention_mask=mask,
                position_ids=position.unsqueeze(1),
                use_cache=True,
                **{state.cache_kw: cache},
            )
            position = position + 1
            hidden = out.last_hidden_state[:, -1]
            for r in range(rows):
                if closing[r] and not done[r]:
                    result[r] = hidden[r]
                    done[r] = True
            if all(done):
                break
        for r, index in enumerate(chunk):
            completions[index] = generated[r]
            wrote[index] = not appended[r]
        if vectors is None:
            vectors = torch.empty((len(prompts), result.size(-1)), dtype=result.dtype, device=device)
        vectors[torch.as_tensor(chunk, device=device)] = result
    if vectors is None:
        raise ValueError("reason_and_encode got no prompts")
    return vectors, completions, wrote
