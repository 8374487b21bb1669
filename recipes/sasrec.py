"""SASRec (Kang & McAuley, 2018): a self-attentive sequential recommender in plain torch.

Item embedding + learned positional embedding, a stack of causal pre-norm transformer blocks, and
item scores as the dot product of the last hidden state with the (shared) item embedding table.
Sequences are left-padded with the extra index `num_items`, so position -1 is always the newest item.

Training (`fit`) uses each train sample's sequence history + target. By default every position predicts
its next item (the paper's objective: more signal per sequence, and it also learns from short contexts,
which valid/test users with short histories need). data_prep's samples are sliding windows, so sample
k + 1 repeats sample k's transitions; an epoch therefore draws samples / max_len random samples, about
one pass over the train interactions, and validation (valid NDCG@10, for early stopping) runs after
each. On ml-100k, 'last'-position training was at valid NDCG@10 0.072 (still rising) after three full
passes (3.5 min); this default stopped at 0.088 (4.5 min, busy 2-core machine). The loss is a full softmax over the catalog (1.7k items on ml-100k: cheap on CPU);
sampled negatives are an option for large catalogs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class SASRecConfig:
    hidden_size: int = field(default=64, metadata={"help": "Embedding and hidden width (paper: 50)."})
    num_blocks: int = field(default=2, metadata={"help": "Causal self-attention blocks (paper: 2)."})
    num_heads: int = field(default=1, metadata={"help": "Attention heads per block (paper: 1)."})
    dropout: float = field(default=0.2, metadata={"help": "Dropout on embeddings and blocks (paper: 0.2)."})
    max_len: int = field(default=20, metadata={"help": "Longest input sequence; older items are cut."})


class CausalBlock(nn.Module):
    """Pre-norm self-attention + point-wise feed-forward, both residual."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.norm_attn = nn.LayerNorm(cfg.hidden_size)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm_ffn = nn.LayerNorm(cfg.hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: (batch, len, d); allowed: (batch, 1, len, len) True where query may attend key
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, len, d_head)
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.num_items = num_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=num_items)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden_size**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[num_items].zero_()

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs: (batch, len) item indices, left-padded with num_items -> (batch, len, d)."""
        n = seqs.shape[1]
        keep = seqs != self.num_items  # (batch, len)
        x = self.item_emb(seqs) * math.sqrt(self.cfg.hidden_size) + self.pos_emb.weight[-n:]
        x = self.drop(x) * keep.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
        # Padding keys are hidden; every query keeps its own key so no attention row is empty (no NaN).
        allowed = (causal & keep[:, None, :]) | torch.eye(n, dtype=torch.bool, device=seqs.device)
        allowed = allowed.unsqueeze(1)  # (batch, 1, len, len)
        for block in self.blocks:
            x = block(x, allowed) * keep.unsqueeze(-1)
        return self.norm(x)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., d) -> (..., num_items) dot-product scores against every real item."""
        return h @ self.item_emb.weight[: self.num_items].T

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores of the next item after each sequence: (batch, len) -> (batch, num_items)."""
        return self.item_logits(self.hidden(seqs)[:, -1])


def pad_sequences(seqs: list[list[int]], max_len: int, pad: int) -> torch.Tensor:
    """Keep the newest `max_len` items of each sequence and left-pad: -> (len(seqs), max_len) int64."""
    out = torch.full((len(seqs), max_len), pad, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tail = seq[-max_len:]
        if tail:
            out[row, max_len - len(tail) :] = torch.tensor(tail, dtype=torch.long)
    return out


@dataclass
class TrainConfig:
    epochs: int = field(
        default=50, metadata={"help": "Most training epochs (early stopping usually ends sooner)."}
    )
    batch_size: int = field(default=128, metadata={"help": "Training samples per step."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 1e-3)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam L2 weight decay."})
    patience: int = field(
        default=5, metadata={"help": "Epochs without a better valid NDCG@10 before stopping."}
    )
    loss_positions: str = field(
        default="all",
        metadata={
            "help": "'all': every position of history+target predicts its next item (the paper's objective); "
            "'last': only the target is predicted from the full history."
        },
    )
    epoch_samples: int = field(
        default=0,
        metadata={
            "help": "Train samples drawn at random per epoch (between validations). 0 = auto: all of them "
            "with loss_positions=last; samples / max_len with loss_positions=all, because each sample's "
            "window repeats its predecessor's transitions, so that many carry about one pass over the "
            "train interactions."
        },
    )
    num_negatives: int = field(
        default=0,
        metadata={
            "help": "0: full softmax over the catalog. N>0: sampled softmax against N uniform negatives "
            "shared by the batch (for catalogs too large for a full softmax)."
        },
    )

    def __post_init__(self) -> None:
        if self.loss_positions not in ("all", "last"):
            raise ValueError(f"loss_positions must be 'all' or 'last', got {self.loss_positions!r}")


def training_tensors(histories: list[list[int]], targets: list[int], max_len: int, pad: int):
    """Inputs and next-item labels for each sample's sequence history + target.

    Returns (inputs, labels), both (samples, max_len): labels[:, t] is the item after inputs[:, t],
    `pad` where there is none. The last column's label is always the sample's target.
    """
    full = pad_sequences([h + [t] for h, t in zip(histories, targets, strict=True)], max_len + 1, pad)
    return full[:, :-1], full[:, 1:]


def sequence_loss(
    model: SASRec, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """Mean cross-entropy of the next item; inputs, labels: (batch, len)."""
    h = model.hidden(inputs)  # (batch, len, d)
    if cfg.loss_positions == "last":
        h, labels = h[:, -1:], labels[:, -1:]
    elif cfg.loss_positions != "all":
        raise ValueError(f"loss_positions must be 'all' or 'last', got {cfg.loss_positions!r}")
    keep = labels != model.num_items
    h, labels = h[keep], labels[keep]  # (n, d), (n,)
    if cfg.num_negatives <= 0:
        return F.cross_entropy(model.item_logits(h), labels)
    negatives = torch.randint(0, model.num_items, (cfg.num_negatives,))  # (negs,)
    item_w = model.item_emb.weight
    pos = (h * item_w[labels]).sum(-1, keepdim=True)  # (n, 1)
    neg = (h @ item_w[negatives].T).masked_fill(negatives[None, :] == labels[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)  # (n, 1 + negs); the positive is class 0
    return F.cross_entropy(logits, torch.zeros_like(labels))


@torch.no_grad()
def score_histories(model: SASRec, histories: list[list[int]], batch_size: int = 512) -> torch.Tensor:
    """Next-item scores for each history over the whole catalog: -> (users, num_items)."""
    model.eval()
    seqs = pad_sequences(histories, model.cfg.max_len, model.num_items)
    return torch.cat([model(seqs[i : i + batch_size]) for i in range(0, len(seqs), batch_size)])


def fit(
    model: SASRec,
    histories: list[list[int]],
    targets: list[int],
    cfg: TrainConfig,
    validate: Callable[[SASRec], float],
    seed: int = 42,
) -> tuple[float, int]:
    """Train with Adam, keep the state with the best `validate(model)` (valid NDCG@10), load it back.

    Returns (best validation score, its 1-based epoch). Stops after `cfg.patience` epochs without a
    better score.
    """
    inputs, labels = training_tensors(histories, targets, model.cfg.max_len, model.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, cfg.epochs + 1), desc="sasrec", unit="epoch")
    for epoch in bar:
        loss = _train_epoch(model, optimizer, inputs, labels, cfg, order_rng)
        score = validate(model)
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", valid_ndcg10=f"{score:.4f}", best=f"{best:.4f}@{best_epoch}")
        if epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return best, best_epoch


def epoch_size(num_samples: int, cfg: TrainConfig, max_len: int) -> int:
    if cfg.epoch_samples > 0:
        return min(cfg.epoch_samples, num_samples)
    if cfg.loss_positions == "all":
        return max(num_samples // max_len, min(num_samples, cfg.batch_size))
    return num_samples


def _train_epoch(
    model: SASRec,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
) -> float:
    """One shuffled pass over the samples; returns the mean batch loss."""
    model.train()
    order = torch.randperm(len(inputs), generator=rng)[: epoch_size(len(inputs), cfg, inputs.shape[1])]
    total = 0.0
    batches = range(0, len(order), cfg.batch_size)
    for start in batches:
        idx = order[start : start + cfg.batch_size]
        loss = sequence_loss(model, inputs[idx], labels[idx], cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(len(batches), 1)
