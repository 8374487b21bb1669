"""Shared fixtures of the trainer tests: a session model cache, a tiny random Llama with the real
SmolLM2 tokenizer, a tiny synthetic dataset and a cheap RecPO configuration.

The embedded SmolLM2 is converted once into the user's `$RECPO_CACHE/models` (`session_recpo_cache`); the tiny
model only borrows its tokenizer, so every trainer test runs in seconds on two cores.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

from recipes.modeling import EMBEDDED_MODEL, cache_root

TINY_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}


@pytest.fixture(scope="session", autouse=True)
def session_recpo_cache(tmp_path_factory) -> Path:
    """One cache folder per test session, so the tests leave nothing in the user's `$RECPO_CACHE`.

    The tiny runs write untrained evaluations and item indexes keyed by their random weights; those belong to the
    session. Only the converted embedded model (`models/`, half a minute to build) is shared with the user's cache,
    through a link, so it is converted once per machine, not per session.
    """
    user_cache = cache_root()
    (user_cache / "models").mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("recpo-cache")
    (cache / "models").symlink_to(user_cache / "models", target_is_directory=True)
    os.environ["RECPO_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def recpo_environment(session_recpo_cache: Path) -> Path:
    """The session's cache (`session_recpo_cache`), no wandb, and one torch thread per process (the box is shared)."""
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    return session_recpo_cache


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The seconds `time.perf_counter` returns inside recipes.trainer: set `clock[0]` to move time."""
    from recipes import trainer as trainer_module

    now = [1000.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


@pytest.fixture(scope="session")
def tokenizer(recpo_environment):
    from recipes.modeling import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


def build_tiny_model(tokenizer, seed: int = 0):
    """A random-weight LlamaForCausalLM with SmolLM2's vocabulary and chat template in mind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_CONFIG,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def chain_model(tokenizer, scripts: dict[int, list[int]]):
    """Tiny Llama whose greedy continuation of a prompt ending in token `k` is `scripts[k]` (then anything).

    Each script must not repeat a token with two different successors. Attention and MLP outputs are
    scaled down, not removed, so the hidden states still depend on the whole context.
    """
    model = build_tiny_model(tokenizer, seed=1)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
        emb = model.model.embed_tokens.weight
        head = torch.nn.Linear(emb.size(1), emb.size(0), bias=False)
        head.weight.zero_()
        successor: dict[int, int] = {}
        for start, script in scripts.items():
            for current, following in zip([start, *script[:-1]], script, strict=True):
                assert successor.setdefault(current, following) == following, "ambiguous script"
        for current, following in successor.items():
            head.weight[following] += 20.0 * emb[current] / emb[current].norm()
        model.lm_head = head
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """Folder with the tiny model and the real tokenizer: what `--model_name_or_path` accepts."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A few hundred samples over ~60 items in the data_prep contract (splits train/valid/test/items)."""
    from data_prep.__main__ import main as data_prep

    root = tmp_path_factory.mktemp("synthetic")
    raw = root / "raw"
    assert (
        data_prep(
            ["synthetic", "--users", "40", "--items", "60", "--interactions", "600", "--out-raw", str(raw)]
        )
        == 0
    )
    out = root / "data"
    assert (
        data_prep(
            [
                "amazon2023",
                "--reviews",
                str(raw / "Synthetic.jsonl.gz"),
                "--meta",
                str(raw / "meta_Synthetic.jsonl.gz"),
                "--out",
                str(out),
                "--window-size",
                "5",
            ]
        )
        == 0
    )
    return out


def recpo_args(output_dir: Path, model_dir: Path | str, data_dir: Path, **overrides):
    """(ScriptArguments, RecPOConfig, ModelConfig) of a tiny run: 2 users x 2 rollouts of 8 tokens, LoRA."""
    from trl import ModelConfig

    from recipes.config import RecPOConfig, ScriptArguments

    script = {
        "data_dir": str(data_dir),
        "max_train_samples": 16,
        "max_eval_users": 4,
        "max_test_users": 4,
        "evaluate_before": False,
        "precision": "float32",  # `auto` would differ from CPU to CPU (bf16 where it has bf16 units)
    }
    model = {
        "model_name_or_path": str(model_dir),
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    training = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "item_batch_size": 64,
        "eval_batch_users": 8,
        "early_stopping_patience": None,
        "log_completions": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "use_cpu": True,
    }
    for key, value in overrides.items():
        target = (
            script
            if key in ScriptArguments.__dataclass_fields__
            else model
            if key in ModelConfig.__dataclass_fields__ and key not in RecPOConfig.__dataclass_fields__
            else training
        )
        target[key] = value
    return ScriptArguments(**script), RecPOConfig(**training), ModelConfig(**model)


def build_trainer(
    tokenizer,
    data_dir: Path,
    output_dir: Path,
    model=None,
    *,
    lora: bool = True,
    random_lora_b: bool = False,
    lora_rank: int = 4,
    lora_layers: list[int] | None = None,
    max_eval_users: int | None = 4,
    users_seed: int | None = None,
    **config,
):
    """A RecPOTrainer on the tiny model and the synthetic data, built in-process (no `main`)."""
    from datasets import load_from_disk
    from peft import LoraConfig

    from recipes.trainer import RecPOTrainer

    data = load_from_disk(str(data_dir))
    _, args, _ = recpo_args(output_dir, "unused", data_dir, **config)
    peft_config = None
    if lora:
        peft_config = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            layers_to_transform=lora_layers,  # None: every layer
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
            # peft's default starts B at zero, which leaves lora_A without gradient at step 0.
            init_lora_weights=not random_lora_b,
        )
    return RecPOTrainer(
        model=model if model is not None else build_tiny_model(tokenizer),
        args=args,
        train_dataset=data["train"].select(range(16)),
        items=data["items"],
        eval_dataset=data["valid"],
        test_dataset=data["test"],
        processing_class=tokenizer,
        peft_config=peft_config,
        max_eval_users=max_eval_users,
        max_test_users=max_eval_users,
        users_seed=users_seed,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, synthetic_data) -> Path:
    """A finished run folder of `recipes.recpo.main` (one step, the untrained model evaluated too, a popularity
    prior, 6 reasoning tokens at evaluation against 8 in the rollouts): what the model card, run folder and
    publishing tests read. Tests that change it work on a copy."""
    from recipes import recpo

    out = tmp_path_factory.mktemp("tiny-run") / "tiny-recpo"
    args = recpo_args(
        out,
        tiny_model_dir,
        synthetic_data,
        max_steps=1,
        evaluate_before=True,
        cache_untrained_evaluation=False,
        popularity_prior_weight=1.0,
        item_logq_correction=True,
        eval_max_completion_length=6,
    )
    recpo.main(*args)
    return out
