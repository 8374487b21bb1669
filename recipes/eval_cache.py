"""The untrained model's evaluation, kept between runs.

Evaluating the model before training is deterministic: the same weights, catalog, users and settings give
the same ranks. On the CPU default it costs about three minutes (the 1,682-item index and greedy
reasoning for 400 users), so a second run of a recipe reads it from `$RECPO_CACHE/evaluations/` instead,
together with the item index, which the first training step reuses.

The key covers what the result depends on: the weights (a fingerprint of every parameter, LoRA adapters
included), the rendered item prompts, the chat template, the data splits (their `datasets` fingerprints),
the evaluated users (sample indices), the evaluation settings, the device and dtype, and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import transformers
import trl

from recipes.loading import prompts_fingerprint, weights_fingerprint
from recipes.modeling import cache_root

logger = logging.getLogger(__name__)

# Bump when the evaluation code changes what it computes (2: bf16 decoding attention in float32 without AMX).
VERSION = 2


def evaluation_key(trainer, splits: dict[str, list[dict] | None], data_fingerprints: dict[str, str]) -> str:
    """A hash of everything the trainer's `ranking_evaluation(splits)` result depends on."""
    args = trainer.args
    model = trainer.model
    param = next(model.parameters())
    described = {
        "version": VERSION,
        "weights": weights_fingerprint(model),
        "item_prompts": prompts_fingerprint(trainer.item_prompt_ids),
        "chat_template": hashlib.sha256(str(trainer.processing_class.chat_template).encode()).hexdigest(),
        "data": data_fingerprints,
        "users": {name: [row["sample_index"] for row in rows] for name, rows in splits.items() if rows},
        "settings": {
            "reasoning": args.reasoning,
            "tau": args.similarity_temperature,
            "max_new_tokens": args.eval_max_completion_length or args.max_completion_length,
            "marker": args.answer_marker,
            "eval_batch_users": args.eval_batch_users,
            "item_batch_size": args.item_batch_size,
            "prior": _tensor_digest(trainer.prior_bias),
        },
        "device": [param.device.type, str(param.dtype), trainer.accelerator.num_processes],
        "versions": [torch.__version__, transformers.__version__, trl.__version__],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _tensor_digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_path(key: str) -> Path:
    return cache_root() / "evaluations" / key


def load(key: str) -> tuple[dict[str, float], dict, torch.Tensor] | None:
    """(metrics, per-user ranks, item index) of a cached evaluation, or None."""
    folder = cache_path(key)
    try:
        saved = json.loads((folder / "evaluation.json").read_text())
        index = torch.load(folder / "item_index.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError):
        return None
    return saved["metrics"], saved["per_user"], index


def save(key: str, metrics: dict[str, float], per_user: dict, index: torch.Tensor) -> None:
    """Write atomically (a temporary folder renamed at the end): a crash never leaves half an entry."""
    folder = cache_path(key)
    if folder.exists():
        return
    temporary = folder.with_name(folder.name + ".partial")
    temporary.mkdir(parents=True, exist_ok=True)
    (temporary / "evaluation.json").write_text(json.dumps({"metrics": metrics, "per_user": per_user}))
    torch.save(index.cpu(), temporary / "item_index.pt")
    try:
        temporary.rename(folder)
    except OSError:  # another process wrote it first
        logger.info("Evaluation cache %s already written", folder)
