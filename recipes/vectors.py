"""User and item vectors: the final hidden state at the answer marker.

The model's final norm is hooked, so the vector comes out of the same forward pass that computes the
token log-probs (TRL's fused LM head returns no hidden states), without asking the model for every
layer's hidden states and without full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/compile wrappers and the peft shell down to the transformers model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder(model: nn.Module) -> nn.Module:
    """The backbone (embeddings, layers, final norm) without the LM head."""
    base = unwrap(model)
    if hasattr(base, "get_decoder"):
        found = base.get_decoder()
        if found is not None:
            return found
    for name in ("model", "transformer", "backbone"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError(f"Cannot find the decoder of {type(base).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last layer's output; its output is the hidden state the LM head reads."""
    backbone = decoder(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"Cannot find the final norm of {type(backbone).__name__}; RecPO reads the hidden state after it"
    )


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """No gradient and no dropout for the block; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class HiddenCapture:
    """Holds the final norm's outputs of the forward passes run inside `capture_final_hidden`."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    @property
    def hidden(self) -> torch.Tensor:
        if not self.outputs:
            raise RuntimeError("No forward pass ran inside capture_final_hidden")
        return (
            self.outputs[0] if len(self.outputs) == 1 else torch.cat(self.outputs, dim=0)
        )  # (batch, len, d)


@contextlib.contextmanager
def capture_final_hidden(model: nn.Module) -> Iterator[HiddenCapture]:
    capture = HiddenCapture()

    def hook(_module, _inputs, output):
        capture.outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = final_norm(model).register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


def last_token_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden state at `positions` (default: the last column, for left-padded batches). (batch, d)"""
    with capture_final_hidden(model) as capture:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = capture.hidden  # (batch, len, d)
    if positions is None:
        return hidden[:, -1]
    return hidden[torch.arange(hidden.size(0), device=hidden.device), positions]


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def encode_sequences(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    progress: str | None = None,
) -> torch.Tensor:
    """Vectors at the last token of each sequence, in batches sorted by length (less padding). (n, d)"""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: torch.Tensor | None = None
    for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
        ids, mask = left_pad([sequences[i] for i in chunk], pad_id, device)
        vectors = last_token_hidden(model, ids, mask)
        if out is None:
            out = torch.empty((len(sequences), vectors.size(-1)), dtype=vectors.dtype, device=vectors.device)
        out[torch.as_tensor(chunk, device=vectors.device)] = vectors
    if out is None:
        raise ValueError("encode_sequences got no sequences")
    return out


class MarkerCloser:
    """Finds the answer marker in generated token ids and closes every rollout with it.

    Generated text is searched, not a fixed token pattern: BPE tokenisers spell `<answer>` with
    different ids depending on what precedes it (`<` vs ` <`), so a fixed id sequence would miss it.
    """

    def __init__(self, tokenizer, marker: str) -> None:
        self.tokenizer = tokenizer
        self.marker = marker
        self.marker_ids: list[int] = tokenizer.encode(marker, add_special_tokens=False)
        self._pieces: dict[int, str] = {}
        self.special_ids = set(tokenizer.all_special_ids)

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = piece
        return piece

    def marker_end(self, ids: Sequence[int]) -> int | None:
        """Index of the token that completes the first marker in `ids`, or None."""
        text, ends = "", []
        for token_id in ids:
            text += self._piece(token_id)
            ends.append(len(text))
        start = text.find(self.marker)
        if start < 0:
            return None
        stop = start + len(self.marker)
        for index, end in enumerate(ends):
            if end >= stop:
                return index
        return None

    def close(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """Cut `ids` right after the marker; if there is none, drop trailing special tokens and append it.

        Returns the closed ids and whether the model wrote the marker itself.
        """
        ids = list(ids)
        end = self.marker_end(ids)
        if end is not None:
            return ids[: end + 1], True
        while ids and ids[-1] in self.special_ids:
            ids.pop()
        return ids + self.marker_ids, False


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version's forward takes."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first, shortest = sequences[0], min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


@torch.no_grad()
def encode_shared_prefix(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
    progress: str | None = None,
    min_prefix: int = 8,
) -> torch.Tensor:
    """`encode_sequences` for inputs that share a long prefix (item prompts share their instruction).

    The prefix runs once; its key/value cache is copied for each batch of right-padded suffixes, so
    the catalog costs only its suffix tokens. Falls back to the plain path when little is shared.
    (n, d)
    """
    if len(sequences) < 2 or _common_prefix_length(sequences) < min_prefix:
        return encode_sequences(model, sequences, pad_id, batch_size, progress)
    device = next(model.parameters()).device
    backbone = decoder(model)
    cache_kw = _cache_kwarg(backbone)
    prefix_len = _common_prefix_length(sequences)
    prefix = torch.as_tensor([list(sequences[0][:prefix_len])], device=device)
    prefix_out = backbone(input_ids=prefix, use_cache=True)
    prefix_cache = getattr(prefix_out, cache_kw, None) or prefix_out.past_key_values
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: torch.Tensor | None = None
    for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
        suffixes = [sequences[i][prefix_len:] for i in chunk]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), prefix_len + width), dtype=torch.long, device=device)
        mask[:, :prefix_len] = 1
        for row, suffix in enumerate(suffixes):
            ids[row, : len(suffix)] = torch.as_tensor(suffix, device=device)
            mask[row, prefix_len : prefix_len + len(suffix)] = 1
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(chunk))
        with capture_final_hidden(model) as capture:
            backbone(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
        hidden = capture.hidden  # (chunk, width, d)
        last = torch.as_tensor([len(s) - 1 for s in suffixes], device=device)
        vectors = hidden[torch.arange(len(chunk), device=device), last]
        if out is None:
            out = torch.empty((len(sequences), vectors.size(-1)), dtype=vectors.dtype, device=device)
        out[torch.as_tensor(chunk, device=device)] = vectors
    return out


@torch.no_grad()
def greedy_reason_and_encode(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    closer: MarkerCloser,
    max_new_tokens: int,
    batch_size: int = 32,
    progress: str | None = None,
) -> tuple[torch.Tensor, list[list[int]], list[bool]]:
    """Greedy reasoning that also returns the user vectors, without a second pass over the text.

    The decoding loop feeds the marker's last token like any other, so its hidden state comes out of
    the loop itself: evaluation costs one prefill instead of two. Rollouts are closed exactly as
    `MarkerCloser.close` closes them (cut after the marker; EOS or the length limit: marker appended).
    Returns (vectors (n, d), completion ids, whether the model wrote the marker itself).
    """
    device = next(model.parameters()).device
    backbone = decoder(model)
    head = unwrap(model).get_output_embeddings()
    cache_kw = _cache_kwarg(backbone)
    eos_ids = {
        tokenizer.eos_token_id,
        *([tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else []),
    }
    vectors: torch.Tensor | None = None
    completions: list[list[int]] = [[] for _ in prompts]
    wrote: list[bool] = [False for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
        ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
        out = backbone(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, cache_kw, None) or out.past_key_values
        hidden = out.last_hidden_state[:, -1]  # (chunk, d)
        rows = len(chunk)
        generated: list[list[int]] = [[] for _ in range(rows)]
        texts = ["" for _ in range(rows)]
        forced: list[list[int]] = [[] for _ in range(rows)]
        closing = [False] * rows  # the token fed now completes the marker
        appended = [False] * rows  # the marker was forced in (EOS or length limit)
        done = [False] * rows
        result = torch.zeros((rows, hidden.size(-1)), dtype=hidden.dtype, device=device)
        for _ in range(max_new_tokens + len(closer.marker_ids) + 1):
            choice = head(hidden).argmax(dim=-1).tolist()
            feed = []
            for r in range(rows):
                if done[r]:
                    feed.append(tokenizer.pad_token_id)
                    continue
                token = forced[r].pop(0) if forced[r] else choice[r]
                if not appended[r] and token in eos_ids:  # ended without the marker
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
            step_ids = torch.as_tensor(feed, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            out = backbone(input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
            cache = getattr(out, cache_kw, None) or out.past_key_values
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
        raise ValueError("greedy_reason_and_encode got no prompts")
    return vectors, completions, wrote
