"""User and item vectors: the final hidden state at the answer marker.

The model's final norm is hooked, so the vector comes out of the same forward pass that computes the
token log-probs (TRL's fused LM head returns no hidden states), without asking the model for every
layer's hidden states and without full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
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
