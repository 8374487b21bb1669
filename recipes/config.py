"""Configuration of a RecPO run: script arguments and `RecPOConfig(trl.GRPOConfig)`.

Every field has a help string, shown by `python recipes/recpo.py --help`; defaults that reproduce the
paper say so. TRL's own GRPO fields (rollouts, temperature, clipping, loss type, vLLM...) keep their
names and meaning; only the defaults RecPO needs are changed here.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig

ADVANTAGE_KINDS = ("gaussian", "leave_one_out")


@dataclass
class ScriptArguments:
    data_dir: str = field(
        default="data/ml-100k",
        metadata={"help": "Dataset folder written by `python -m data_prep` (splits train/valid/test/items)."},
    )
    prepare_data: bool = field(
        default=False,
        metadata={
            "help": "If `data_dir` does not exist, build it first with `python -m data_prep movielens` "
            "(the embedded MovieLens-100K). Used by `make train`."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on a random subset of this many samples (all by default)."},
    )
    max_eval_users: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on a fixed random subset of this many valid users at each evaluation (all by default). "
            "The CPU recipe uses a few hundred to stay within its time budget."
        },
    )
    max_test_users: int | None = field(
        default=None,
        metadata={"help": "Evaluate on this many test users at the end (all by default)."},
    )
    eval_users_seed: int = field(
        default=42,
        metadata={
            "help": "Seed that draws the max_eval_users / max_test_users subsets (default 42, whatever --seed is): "
            "runs of other training seeds score the same users as each other and as `make baselines`, so they "
            "can be compared user by user."
        },
    )
    evaluate_test: bool = field(
        default=True, metadata={"help": "Evaluate the final (best) model on the test split at the end."}
    )
    time_budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training (cleanly, after the current step) once this many minutes of training have "
            "passed; the final evaluation still runs. Lets a CPU run fit a wall-clock budget on any machine. The "
            "progress bar ends at the step where the budget is expected to stop the run, so its time left is the "
            "budget's."
        },
    )
    time_budget_recpo_share: float = field(
        default=0.0,
        metadata={
            "help": "With time_budget_minutes and an item warm-up (item_warmup_steps) followed by RecPO steps: the "
            "share of the budget kept for the RecPO steps. Once the warm-up has spent the rest, it ends after that "
            "step and the run's RecPO steps (max_steps - item_warmup_steps) follow, so that a slow machine still "
            "trains with reasoning instead of spending the whole budget on the warm-up (run_config.json records "
            "the shortened item_warmup_steps and max_steps). 0 (default): the warm-up runs all its steps whatever "
            "the budget. The CPU recipe keeps 0.2 (its 12 RecPO steps and the index they rebuild take 2-6 min)."
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base weights: `auto`, `float32` or `bfloat16`. `auto`: on a CPU, bfloat16 "
            "where it has bf16 matrix units (AMX-BF16 or AVX512-BF16, read from its feature flags), else float32; "
            "on a GPU, the model's `dtype` (the paper recipes: bfloat16). The LoRA weights, optimizer state, "
            "log-softmax, cosines, softmaxes and losses stay float32 either way (recipes/precision.py). The "
            "paper trains in bf16. The run records what was used in run_config.json."
        },
    )
    lora_top_layers: int | None = field(
        default=None,
        metadata={
            "help": "Put the LoRA adapter only on the last N decoder layers (every layer by default, as in the "
            "paper). The backward pass then stops at the lowest adapted layer, so a step costs less (on the CPU "
            "default, N = 15 of 30 takes a warm-up step in 0.63x the time, but learned less in the same steps: "
            "reports/README.md). Needs `use_peft`."
        },
    )
    evaluate_before: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the untrained model on valid and test before training (results_before.json)."
        },
    )
    cache_untrained_evaluation: bool = field(
        default=True,
        metadata={
            "help": "Keep the untrained model's evaluation (metrics, per-user ranks, item index) in "
            "$RECPO_CACHE/evaluations, keyed by the weights, data, users and evaluation settings, and read it back "
            "when a run evaluates the same model again (it is deterministic; on the CPU default it costs about "
            "three minutes). An untrained LoRA adapter computes nothing, so runs that differ only in its seed, "
            "rank or adapted layers share one entry."
        },
    )

    def __post_init__(self):
        if not 0.0 <= self.time_budget_recpo_share < 1.0:
            raise ValueError(
                f"time_budget_recpo_share must be at least 0 and below 1, got {self.time_budget_recpo_share}"
            )


@dataclass
class RecPOConfig(GRPOConfig):
    # --- RecPO ---
    answer_marker: str = field(
        default="<answer>",
        metadata={
            "help": "Text that closes the reasoning; the hidden state at its last token is the user vector."
        },
    )
    reasoning: bool = field(
        default=True,
        metadata={
            "help": "Reason before recommending (RecPO). False is the paper's no-reasoning ablation: the user vector "
            "is read right after the prompt, no rollouts are sampled and only the item loss trains the model."
        },
    )
    similarity_temperature: float = field(
        default=0.02,
        metadata={"help": "tau in s(u, i) = cos(h_u, h_i) / tau. The paper uses 0.02."},
    )
    ndcg_cutoff: int = field(
        default=1000,
        metadata={"help": "K of the NDCG reward: 1/log2(rank + 1) if rank <= K else 0. The paper uses 1000."},
    )
    softmax_reward_weight: float = field(
        default=0.05,
        metadata={
            "help": "beta of the fused reward R = (1 - beta) NDCG + beta P(target). The paper uses 0.05. Sets TRL's "
            "`reward_weights` to (1 - beta, beta) unless `reward_weights` is given."
        },
    )
    advantage_kind: str = field(
        default="gaussian",
        metadata={
            "help": "Group advantage: `gaussian` (r - mean) / (std + 1e-8), the paper's; or `leave_one_out` "
            "(r minus the mean of the other rollouts)."
        },
    )
    relabel_topk: int = field(
        default=1,
        metadata={
            "help": "Rollouts per group (best by advantage) that feed the item loss. The paper's default is 1; its "
            "reference launch uses 2."
        },
    )
    item_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the item surrogate in L = L_token + w * L_item (1 in the paper)."},
    )
    item_logq_correction: bool = field(
        default=False,
        metadata={
            "help": "Subtract log q(i) from each in-batch column's score in the item loss, q(i) being how often "
            "item i is a training target (add-one smoothed). In-batch negatives are drawn by popularity, so the "
            "plain in-batch softmax learns cos ~ log p(i|u) - log p(i) and unlearns popularity, which "
            "full-catalog Hit@K rewards; the correction makes it estimate the full softmax of the score instead "
            "(sampled-softmax bias correction; with popularity_prior_weight lambda, each column's logit is then "
            "cos / tau + (lambda - 1) log q). Not in the paper: false reproduces it."
        },
    )
    popularity_prior_weight: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the popularity prior: s(u, i) = cos(h_u, h_i) / tau + lambda * log q(i), q(i) being item "
            "i's share of the train split's targets (add-one smoothed). Every consumer of the score uses it: the "
            "RecPO rewards (rank and softmax), the item loss (each in-batch column gets + lambda log q), the "
            "evaluation, and the run's `recipes.evaluate` / `recipes.recommend` (stored as score_prior.pt). An "
            "in-batch softmax with popularity-drawn negatives learns about log p(i|u) - log q(i); the prior adds "
            "log q back at ranking. With item_logq_correction and lambda 1 the two cancel in the item loss, which "
            "is then the paper's, while the ranking keeps the prior. Not in the paper: 0 reproduces it."
        },
    )
    popularity_prior_half_life_days: float | None = field(
        default=None,
        metadata={
            "help": "Count each train target 2^(-age / half-life) in the popularity prior, its age in days before the "
            "last train target (default: None, every target counts 1)."
        },
    )
    item_negatives: int = field(
        default=0,
        metadata={
            "help": "Catalog items drawn uniformly at random (targets of the batch excluded) and encoded, with "
            "gradient, as extra columns of the item loss at every step, beside the in-batch targets. The paper's "
            "item loss has only the in-batch targets (0): with 4 users a step that is a 4-way softmax, and its "
            "negatives are popular items. Full-catalog ranking puts the target against every item, which uniform "
            "negatives sample directly. Each costs an item prompt's forward and backward (about 27 tokens on "
            "MovieLens). With item_logq_correction, every column is corrected by the log of the mixed rate."
        },
    )
    item_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Start the run with this many optimizer steps of the no-reasoning item loss (the user vector read "
            "right after the prompt, cross-entropy over the in-batch items), then train RecPO with reasoning: a "
            "cold start, as R1-style recipes start RL from a tuned policy. Not in the paper (0)."
        },
    )
    warmup_restarts: int = field(
        default=0,
        metadata={
            "help": "How many times the item warm-up may start over when its vectors collapse. After "
            "warmup_restart_check_steps warm-up steps (counted from the last start), if the in-batch score spread "
            "(standard deviation of cos / tau over each row's in-batch items, averaged over the last 10 steps and "
            "the processes) is below 0.1, the item vectors have collapsed to one direction, where the cosine's "
            "gradient vanishes and the warm-up stays (on MovieLens, 2 of 5 data orders do so within 25 steps): the "
            "LoRA factors are drawn afresh (from seed + restart), Adam's state is cleared, and the warm-up and "
            "max_steps grow by the steps spent; the data order continues, so the new start sees other first "
            "batches (run_config.json then records the lengthened item_warmup_steps and max_steps; a resumed run "
            "takes the restarts back from its checkpoint). Reads only the training batches, never the evaluation "
            "users. Measured on MovieLens seed 42 (restarts at steps 25 and 50): after 100 warm-up steps the run "
            "ends spread (index score spread 0.20 against 0.03) but ranks at popularity's level; after 300 it ranks "
            "well ahead of popularity, so the CPU recipe allows 2 (reports/README.md). Not in the paper (0)."
        },
    )
    warmup_restart_check_steps: int = field(
        default=25,
        metadata={
            "help": "Warm-up steps after each (re)start at which warmup_restarts checks for a collapse."
        },
    )
    item_warmup_average_steps: int = field(
        default=0,
        metadata={
            "help": "Replace the trainable weights by their mean over the item warm-up's last N steps (stochastic "
            "weight averaging) before the run goes on: the warm-up's constant-rate steps are noisy, and where the "
            "path ends is partly chance. The mean takes the weights' place before the first RecPO step (or before "
            "the final evaluation of a run that ends in its warm-up); a warm-up restart starts the average afresh; "
            "a warm-up that the time budget cuts short averages the steps of the window it reached. Keeps a float32 "
            "copy of the trainable weights until it is used. Measured on MovieLens (reports/README.md, 'Averaging "
            "the warm-up's weights'): the CPU recipe with 150, against the same seeds without, moved the mean rank "
            "(valid / test) by -43.8 / -14.9, +19.3 / +10.7 and -4.5 / -4.8 places, and test NDCG@10 by -.004 to "
            "-.011. 0 (default): off. Not in the paper."
        },
    )
    gather_negatives: bool = field(
        default=True,
        metadata={"help": "Use the other processes' in-batch target items as negatives of the item loss."},
    )
    index_refresh_steps: int = field(
        default=0,
        metadata={
            "help": "Re-encode the whole catalog every this many optimizer steps (0: only at evaluations). The batch's "
            "target rows are refreshed at every step regardless."
        },
    )
    score_with_fresh_targets: bool = field(
        default=False,
        metadata={
            "help": "Refresh the batch's target rows before the rollouts are scored (True) or right after (False, "
            "default). Before lets the policy earn reward from the refresh itself: the target is then the one "
            "fresh row among stale ones, and a rollout whose user vector moves wherever the policy's fresh vectors "
            "go outranks its siblings. On the CPU default (lr 5e-4 and 1e-3) that taught SmolLM2 to write the "
            "marker at once: rollouts' mean target rank fell to 5 while the evaluation's got worse. Either way "
            "the rows are refreshed every step; at the paper's lr 1e-5 the vectors drift little and the two agree."
        },
    )
    item_batch_size: int = field(
        default=32, metadata={"help": "Items per forward pass when (re)building the catalog index."}
    )
    eval_batch_users: int = field(
        default=32, metadata={"help": "Users per batch of greedy reasoning during evaluation."}
    )
    eval_max_completion_length: int | None = field(
        default=None,
        metadata={
            "help": "New-token limit of greedy reasoning at evaluation (default: max_completion_length)."
        },
    )
    fast_rollouts: bool = field(
        default=True,
        metadata={
            "help": "Sample rollouts with RecPO's own decoding loop instead of transformers' generate: each distinct "
            "prompt is prefilled once for its G rollouts, the instruction every prompt starts with once per batch, "
            "and the user vector is read inside the loop (no second forward to score the rollouts). Samples come "
            "from the same distribution (transformers' temperature, top-k, top-p and min-p warpers, the same "
            "stopping rules); with the same seed and batch order the very same tokens. Falls back to TRL's path, "
            "logged once, with vLLM, continuous batching, ZeRO-3/FSDP, other generation settings (e.g. "
            "repetition_penalty), models that scale their logits, and active dropout (TRL samples in train mode: "
            "set `disable_dropout: true`)."
        },
    )
    shared_prompt_forward: bool = field(
        default=True,
        metadata={
            "help": "In the loss, run each distinct prompt once with gradient and only [last prompt token, "
            "completion] per rollout, on a copy of its keys and values (TRL runs every rollout's whole prompt; "
            "prompts are most of a rollout's tokens, and G rollouts share one). Same loss and gradient to float "
            "rounding. Falls back to TRL's forward, logged once, under gradient checkpointing (it drops the "
            "cache), for multimodal inputs and MoE auxiliary losses."
        },
    )
    recompute_prompts: bool = field(
        default=False,
        metadata={
            "help": "Recompute the prompts' forward in the backward pass instead of keeping its activations until "
            "then (activation checkpointing of the prompts only; with `shared_prompt_forward`, and in the "
            "no-reasoning item loss): the same gradients for one more forward of the distinct prompts. For GPUs, "
            "whose caching allocator returns the memory. Measured on the CPU default: +1.3 s a step and no lower "
            "peak resident memory (2.9-3.0 GB with it, 2.8-2.9 GB without), so the CPU recipe leaves it off."
        },
    )
    keep_fewer_activations: bool = field(
        default=True,
        metadata={
            "help": "RMSNorm and the SwiGLU product (Llama, Qwen2, Qwen3, Mistral) with hand-written backward passes "
            "that keep the norm's input instead of its float32 copy, and the MLP's gate and up projections "
            "without their SiLU (recipes/saved_activations.py). The same forward bit for bit, the same gradients to "
            "float rounding; in bf16 about a fifth fewer activation bytes (SmolLM2-135M with LoRA, a warm-up-sized "
            "batch: 775 -> 629 MB; 12 warm-up steps of the CPU default peaked at 1.82 GB against 1.94). False: "
            "transformers' own modules."
        },
    )
    release_freed_memory: bool = field(
        default=False,
        metadata={
            "help": "On Linux with glibc, hand freed heap memory back to the system (malloc_trim) after loading, "
            "each training step, item index and evaluation. glibc otherwise keeps what a phase freed: between "
            "the CPU default's warm-up steps 1.09 GB resident with it against 1.94 GB without. It does not lower "
            "the peak (a `make train` with it peaked at 2.49 GB, as before), and the pages are faulted back in "
            "at the next step, so it is off; for machines shared with other jobs. No effect elsewhere. (Before each "
            "item index build, the start of RecPO and of every evaluation, the trainer trims anyway: once a phase.)"
        },
    )
    merge_adapters_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Fold the LoRA adapter into the base weights for every forward without gradient (rollouts "
            "generated with transformers or RecPO's loop, the item index, the evaluation) and take it out after "
            "(also on error): one matmul per layer instead of three. float32 base weights are merged in place and "
            "unmerged (float32 rounding: ~1e-7 relative after 1,000 steps); bf16/fp16 ones are merged into copies "
            "that stand in for the base weights during the block (one copy of the adapted weights, ~0.2 GB for "
            "SmolLM2 in bf16), the originals put back bit for bit. Measured on an H200 (Qwen2.5-0.5B shape, LoRA "
            "r16 on all linear layers, 64 prompts x 256 tokens -> 128 new, float32): 2,583 new tokens/s merged "
            "against 1,604-1,685 unmerged; on a 2-core Xeon the bf16 item index of the CPU default in 28 s "
            "against 55 s unmerged. Skipped, and logged once, where it would change the samples or the weights: "
            "quantised base layers, parameters sharded by ZeRO-3/FSDP, base weights tied to another layer, an "
            "adapter already merged, and active LoRA dropout (TRL samples rollouts in train mode, where an "
            "unmerged adapter applies dropout: set `disable_dropout: true` or `lora_dropout: 0` to merge). Unused "
            "with vLLM, which syncs the weights itself, and with transformers' continuous batching, which casts "
            "them to the training precision."
        },
    )
    evals_per_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Evaluate (and save) this many times per epoch; overrides eval_steps/save_steps. The paper "
            "evaluates 8 times per epoch."
        },
    )
    early_stopping_patience: int | None = field(
        default=8,
        metadata={
            "help": "Stop after this many evaluations without a better valid NDCG@10 (paper: 8; None: off)."
        },
    )

    # --- TRL/transformers defaults changed to the paper's reference settings ---
    learning_rate: float = field(default=1e-5, metadata={"help": "Paper: 1e-5, constant after warm-up."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata={"help": "Paper: constant with warm-up."}
    )
    warmup_steps: float = field(default=32, metadata={"help": "Paper: 32 warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Paper: gradient clipping at 1.0."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Paper: 3 epochs."})
    num_generations: int | None = field(default=4, metadata={"help": "Rollouts per user (G). Paper: 4."})
    per_device_train_batch_size: int = field(
        default=16,
        metadata={
            "help": "Rollouts per device per step = users per device x num_generations. Paper: 4 users x 4."
        },
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Sampling temperature of rollouts. Paper: 2.0."}
    )
    top_k: int = field(default=50, metadata={"help": "Top-k sampling of rollouts. Paper: 50."})
    max_completion_length: int | None = field(
        default=640, metadata={"help": "New-token limit of a rollout's reasoning. Paper: 640."}
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clip epsilon of both surrogates. Paper: 0.2."}
    )
    epsilon_high: float | None = field(
        default=0.28, metadata={"help": "Upper clip epsilon of both surrogates. Paper: 0.28."}
    )
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient. Paper: 0 (no KL term, no reference model)."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed. Paper: 42."})
    metric_for_best_model: str | None = field(
        default="valid/ndcg@10", metadata={"help": "Checkpoint selection metric. Paper: valid NDCG@10."}
    )
    greater_is_better: bool | None = field(default=True, metadata={"help": "Higher metric is better."})
    log_completions: bool = field(
        default=True, metadata={"help": "Log the rollouts table (reasoning, target, top-5, rank)."}
    )

    def __post_init__(self):
        if self.advantage_kind not in ADVANTAGE_KINDS:
            raise ValueError(f"advantage_kind must be one of {ADVANTAGE_KINDS}, got {self.advantage_kind!r}")
        if not 0.0 <= self.softmax_reward_weight <= 1.0:
            raise ValueError(f"softmax_reward_weight must lie in [0, 1], got {self.softmax_reward_weight}")
        if self.similarity_temperature <= 0:
            raise ValueError(f"similarity_temperature must be positive, got {self.similarity_temperature}")
        if self.item_negatives < 0 or self.item_warmup_steps < 0:
            raise ValueError("item_negatives and item_warmup_steps must be >= 0")
        if self.warmup_restarts < 0 or self.warmup_restart_check_steps < 1:
            raise ValueError("warmup_restarts must be >= 0 and warmup_restart_check_steps >= 1")
        if self.item_warmup_average_steps < 0:
            raise ValueError(f"item_warmup_average_steps must be >= 0, got {self.item_warmup_average_steps}")
        if self.popularity_prior_half_life_days is not None and self.popularity_prior_half_life_days <= 0:
            raise ValueError(
                f"popularity_prior_half_life_days must be positive, got {self.popularity_prior_half_life_days}"
            )
        if self.relabel_topk < 1:
            raise ValueError(f"relabel_topk must be at least 1, got {self.relabel_topk}")
        if self.bf16 is None:  # TRL turns bf16 on by default; that needs a GPU, so decide by the hardware
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.reward_weights is None:
            self.reward_weights = [1.0 - self.softmax_reward_weight, self.softmax_reward_weight]
        if self.mask_truncated_completions:
            raise ValueError(
                "mask_truncated_completions cannot be used with RecPO: every rollout is closed with the answer "
                "marker (appended when the length limit cuts the reasoning), so none counts as truncated."
            )
        if self.num_iterations > 1 and self.reasoning and self.item_loss_weight != 0:
            raise ValueError(
                f"num_iterations is {self.num_iterations}, but the item surrogate's ratio p / p.detach() is taken "
                "from the current policy alone: it stays 1 on every reuse of a batch, so the item loss would never be "
                "clipped. Set num_iterations: 1 (the paper's), or item_loss_weight: 0 to reuse batches for the token "
                "loss alone."
            )
        if self.num_generations is not None and self.relabel_topk > self.num_generations:
            raise ValueError(
                f"relabel_topk ({self.relabel_topk}) exceeds num_generations ({self.num_generations})"
            )
        launched = launched_processes()
        if launched > 1 and not self.use_cpu and not torch.accelerator.is_available():
            # accelerate forms a gloo job of several CPU processes only with use_cpu (its launcher does not pass a
            # config's `use_cpu` to MULTI_GPU processes): without it each process would train a model of its own.
            self.use_cpu = True
        if self.use_cpu or not torch.accelerator.is_available():
            # Pinned memory needs an accelerator; without one torch warns at every data loader.
            self.dataloader_pin_memory = False
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            # transformers 5 renamed these and warns whenever only the old name is set: with TRL's default
            # (gradient_checkpointing True) and the recipes' key, that is every run. Carry the value over instead.
            if getattr(self, new, None) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()  # parses a JSON `generation_kwargs` given on the command line into a dict
        if launched > 1 and self.world_size == 1:
            raise ValueError(
                f"{launched} processes were launched, but each would train a model of its own in the same output_dir "
                "(world size 1 in each): accelerate found no distributed backend for this device. Launch one "
                "process, or set `use_cpu: true` to train in several CPU processes."
            )
        if self.use_vllm and self.reasoning:
            self.generation_kwargs = vllm_stop_at_marker(self.generation_kwargs, self.answer_marker)


def launched_processes() -> int:
    """How many processes the launcher started: torchrun's and accelerate's WORLD_SIZE, or mpirun's own variable."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def vllm_stop_at_marker(generation_kwargs: dict | None, marker: str) -> dict:
    """`generation_kwargs` with the answer marker among vLLM's stop strings, kept in the output.

    transformers' generate stops at the marker through `recipes.evaluation.stop_at_marker`; vLLM never sees that
    hook: TRL 1.16 hands `generation_kwargs` to vLLM's `SamplingParams` (colocate) or its server, so without this
    every rollout would run to max_completion_length and be cut afterwards. A user's own stop strings are kept;
    an explicit `include_stop_str_in_output` too (RecPO finds the marker in the token ids either way).
    """
    kwargs = dict(generation_kwargs or {})
    stop = kwargs.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if marker not in stop:
        stop.append(marker)
    kwargs["stop"] = stop
    kwargs.setdefault("include_stop_str_in_output", True)
    return kwargs


# Fields that say where a run writes, how it logs or how it is launched, and those TRL or RecPOConfig derive from
# other fields: not part of the recipe a run reports (recipes/model_card.py).
BOOKKEEPING_FIELDS = frozenset(
    {
        "output_dir",
        "logging_dir",
        "run_name",
        "report_to",
        "disable_tqdm",
        "logging_steps",
        "log_completions",
        "num_completions_to_print",
        "dataloader_num_workers",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "hub_private_repo",
        "hub_strategy",
        "hub_revision",
        "use_cpu",
        "bf16",  # decided by the hardware when not given; the run's precision is recorded on its own
        "reward_weights",  # (1 - softmax_reward_weight, softmax_reward_weight) unless given
        "generation_batch_size",
        "steps_per_generation",
        "local_rank",
        "debug",
        "accelerator_config",
        "activation_checkpointing",  # mirrors gradient_checkpointing
        "pad_to_multiple_of",  # `auto` resolved by TRL
        "dataloader_pin_memory",  # off on CPU
    }
)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return _plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _plain(f.default_factory())
    return None


def changed_settings(config: RecPOConfig) -> dict[str, dict[str, Any]]:
    """The training settings of a run that differ from RecPOConfig's defaults, for its run_config.json:
    `{name: {"value": ..., "default": ..., "paper": bool}}`, `paper` true where the default is the paper's
    (RecPOConfig's own fields whose help string says so), so the model card can list the departures from it."""
    values = config.to_dict()  # JSON-ready: enums as their values, tokens masked
    own = set(RecPOConfig.__annotations__)
    changed = {}
    for f in dataclasses.fields(config):
        if f.name in BOOKKEEPING_FIELDS or f.name not in values:
            continue
        value, default = values[f.name], _declared_default(f)
        if value == default:
            continue
        paper = f.name in own and "paper" in f.metadata.get("help", "").lower()
        changed[f.name] = {"value": value, "default": default, "paper": paper}
    return changed


# The settings a run's model card summarises the recipe with (recipes/model_card.py), recorded whatever their value.
RECIPE_FIELDS = (
    "reasoning",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_completion_length",
    "eval_max_completion_length",
    "temperature",
    "top_k",
    "similarity_temperature",
    "ndcg_cutoff",
    "softmax_reward_weight",
    "advantage_kind",
    "relabel_topk",
    "item_loss_weight",
    "epsilon",
    "epsilon_high",
    "beta",
    "loss_type",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "optim",
    "max_steps",
    "num_train_epochs",
    "seed",
)


def recipe_settings(config: RecPOConfig) -> dict[str, Any]:
    """A run's `training` entry of run_config.json: the recipe's key settings, and every changed one."""
    values = config.to_dict()
    return {
        "settings": {name: values.get(name) for name in RECIPE_FIELDS},
        "changed": changed_settings(config),
    }
