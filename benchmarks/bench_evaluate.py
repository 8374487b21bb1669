"""Cost of an evaluation: the full-catalog item index and greedy reasoning for the evaluated users.

    python -m benchmarks evaluate                        # embedded SmolLM2-135M, CPU: index + 200 valid users
    python -m benchmarks evaluate -- --no-adapter        # the bare model (recipes.evaluate on a base model)
    python -m benchmarks evaluate -- --dtype float32     # one precision only

Times what `make train` pays at each evaluation, with the CPU recipe's settings: the 1,682 MovieLens-100K
items encoded in batches of 64 (`item_batch_size`), then 200 seeded valid users (`max_eval_users`), 16 at a
time (`eval_batch_users`), each writing up to 16 reasoning tokens before the answer marker, all through the
trainer's own functions (`build_item_index`, `evaluate_users`). The model carries a fresh LoRA adapter of
the recipe's shape (r 16 on every projection), folded into the base weights for these forwards as the trainer
does (`adapters_merged`); its B matrices are
zero, so the figures are the untrained model's, at the trained model's cost. Prints each part's seconds,
the throughput, and the process's peak resident memory. `--dtype both` (the default) times float32 base
weights and then bfloat16 ones, where the CPU has bf16 matrix units, and prints the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--users", type=int, default=200, help="valid users evaluated (default: 200)")
    parser.add_argument("--batch-users", type=int, default=16, help="users reasoned at once (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max reasoning tokens (default: 16)")
    parser.add_argument("--item-batch-size", type=int, default=64, help="items encoded at once (default: 64)")
    parser.add_argument("--no-adapter", action="store_true", help="time the bare model, without LoRA")
    parser.add_argument(
        "--dtype",
        default="both",
        choices=["float32", "bfloat16", "both"],
        help="base weights (default: both, bfloat16 only where the CPU has bf16 matrix units)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args(argv)
    from benchmarks.bench_step import precisions_to_time

    timed = {dtype: time_evaluation(args, dtype) for dtype in precisions_to_time(args.dtype)}
    base = timed.get("float32")
    for dtype, (index_s, eval_s) in timed.items():
        if dtype != "float32" and base:
            print(
                f"{dtype} / float32: item index {index_s / base[0]:.2f}x ({index_s:.1f}s / {base[0]:.1f}s), "
                f"greedy reasoning {eval_s / base[1]:.2f}x ({eval_s:.1f}s / {base[1]:.1f}s)"
            )
    return 0


def time_evaluation(args, dtype: str) -> tuple[float, float]:
    """Build the index and evaluate the users in `dtype`; print the figures; return (index s, evaluation s)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_step import ensure_data
    from recipes.baselines import load_dataset_dir
    from recipes.evaluate import item_prompt_ids
    from recipes.evaluation import build_item_index, evaluate_users, sample_indices
    from recipes.loading import load_for_inference
    from recipes.memory import peak_rss_mb
    from recipes.modeling import EMBEDDED_MODEL, cpu_attention_settings
    from recipes.trainer import adapters_merged
    from recipes.vectors import MarkerCloser

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cpu_attention_settings()  # as the trainer and recipes.evaluate run
    torch.manual_seed(0)
    data = load_dataset_dir(ensure_data())
    started = time.perf_counter()
    loaded = load_for_inference(EMBEDDED_MODEL, device="cpu", dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if not args.no_adapter:
        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
    loading = time.perf_counter() - started

    prompts = item_prompt_ids(tokenizer, data["items"])
    # As the trainer runs them: the adapter folded into the base weights (float32: merged in place; bf16: copies).
    merged = contextlib.nullcontext() if args.no_adapter else adapters_merged(model)
    started = time.perf_counter()
    with merged:
        index = build_item_index(
            model, prompts, tokenizer.pad_token_id, args.item_batch_size, progress="item index"
        )
    index_s = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts)
    shared = len(os.path.commonprefix(prompts))  # encoded once for the whole catalog

    rows = data["valid"].select(sample_indices(len(data["valid"]), args.users, 42)).to_list()
    started = time.perf_counter()
    merged = contextlib.nullcontext() if args.no_adapter else adapters_merged(model)
    with merged:
        result = evaluate_users(
            model,
            tokenizer,
            rows,
            index,
            MarkerCloser(tokenizer, "<answer>"),
            reasoning=True,
            max_new_tokens=args.new_tokens,
            batch_size=args.batch_users,
            progress="eval valid",
        )
    eval_s = time.perf_counter() - started

    adapter = "no adapter" if args.no_adapter else "LoRA r16 on every projection, merged as the trainer does"
    print(f"embedded SmolLM2-135M, {dtype}, {adapter}, {torch.get_num_threads()} threads")
    print(f"load: {loading:.1f}s")
    print(
        f"item index: {len(prompts):,} items ({tokens - shared * len(prompts):,} prompt tokens after a shared prefix of "
        f"{shared}) in {index_s:.1f}s, "
        f"{len(prompts) / index_s:.1f} items/s"
    )
    print(
        f"evaluation: {len(rows)} valid users with reasoning (<= {args.new_tokens} tokens, {args.batch_users} at a "
        f"time) in {eval_s:.1f}s, {len(rows) / eval_s:.2f} users/s; mean rank {result.ranks.float().mean().item():.1f}"
    )
    print(f"index + evaluation of one split: {index_s + eval_s:.1f}s")
    print(f"peak resident memory so far {peak_rss_mb():,.0f} MB")
    return index_s, eval_s


if __name__ == "__main__":
    sys.exit(main())
