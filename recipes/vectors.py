"""User and item vectors: the final hidden state at the answer marker.

The model's final norm is hooked, so the vector comes out of the same forward pass that computes the
token log-probs (TRL's fused LM head returns no hidden states), without asking the model for every
layer's hidden states and without full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


def cache_of(output) -> object:
    """The key/value cache a backbone forward returned (`cache` or, in older transformers, `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every sequence shares, leaving each at least one token of its own."""
    first, shortest = sequences[0], min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def gradient_checkpointing_active(model: nn.Module) -> bool:
    """Whether a layer of `model` recomputes its forward in the backward pass (it then drops any KV cache)."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


@dataclass
class Prefill:
    """Prompts run through the backbone, ready to be continued token by token."""

    cache: object  # a transformers Cache with one row per prompt (None under gradient checkpointing)
    mask: torch.Tensor  # (rows, cached) 1 on real tokens, 0 on padding
    next_position: torch.Tensor  # (rows,) position id of each row's next token
    last_hidden: torch.Tensor | None  # (rows, d) final hidden state at each prompt's last token
    cache_kw: str  # the name the backbone's forward gives the cache argument


def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, min_prefix: int = 8) -> Prefill:
    """Run prompts through the backbone so that repeated work runs once.

    Identical prompts (the G rollouts of a user) share one row, and a prefix common to all of them (the
    instruction every user or item prompt starts with) runs once, its keys and values copied to every row;
    each row's own suffix is left-padded after it. Position ids count real tokens only, so a row's values
    equal a plain forward of its prompt (to float rounding). Gradient flows when enabled by the caller,
    through the copies too. The rows of the result follow `prompts`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prefill needs at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    backbone = decoder(model)
    cache_kw = _cache_kwarg(backbone)
    rows: dict[tuple[int, ...], int] = {}
    inverse = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
    unique = list(rows)
    shared = _common_prefix_length(unique) if len(unique) > 1 else len(unique[0]) - 1
    shared = shared if shared >= min_prefix else 0
    if torch.is_grad_enabled() and gradient_checkpointing_active(backbone):
        shared = 0  # checkpointed layers drop the cache when gradient flows: run every prompt whole
    cache = None
    if shared:
        out = backbone(input_ids=torch.as_tensor([unique[0][:shared]], device=device), use_cache=True)
        cache = cache_of(out)
        cache.batch_select_indices(torch.zeros(len(unique), dtype=torch.long, device=device))
    suffixes = [u[shared:] for u in unique]
    ids, suffix_mask = left_pad(suffixes, pad_id, device)
    mask = torch.cat(
        [suffix_mask.new_ones((len(unique), shared)), suffix_mask], dim=1
    )  # (unique, shared + width)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]
    out = backbone(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}
    )
    cache = cache_of(out)
    index = torch.as_tensor(inverse, dtype=torch.long, device=device)
    if cache is not None and (len(unique) != len(prompts) or inverse != sorted(inverse)):
        cache.batch_select_indices(index)
    return Prefill(
        cache=cache,
        mask=mask[index],
        next_position=mask.sum(dim=1)[index],
        last_hidden=out.last_hidden_state[:, -1][index],
        cache_kw=cache_kw,
    )


def encode_shared_prefix(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
    progress: str | None = None,
    min_prefix: int = 8,
) -> torch.Tensor:
    """`encode_sequences` for inputs that share a long prefix (item prompts share their instruction).

    Each batch runs the shared prefix once (a few dozen tokens) and only its rows' own suffixes, so the
    catalog costs about its suffix tokens. Gradient flows when enabled by the caller. (n, d)
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    parts = []
    for chunk in tqdm(chunks, desc=progress, disable=progress is None, unit="batch", leave=False):
        parts.append(prefill(model, [sequences[i] for i in chunk], pad_id, min_prefix).last_hidden)
    if not parts:
        raise ValueError("encode_shared_prefix got no sequences")
    vectors = torch.cat(parts)  # rows in `order`
    return vectors[torch.argsort(torch.as_tensor(order, device=device))]
