"""Time split of a RecPO step: generation, scoring (vectors + rewards), update, and peak memory.

    python -m benchmarks step                      # embedded SmolLM2-135M, CPU: RecPO and warm-up steps, fp32 and bf16
    python -m benchmarks step -- --variant both --precision float32  # TRL's own path against RecPO's, float32
    python -m benchmarks step -- --shape qwen2.5-0.5b --bf16 --precision float32   # random Qwen2.5-0.5B on a GPU

Runs a few real training steps of `recipes/recpo.py` on MovieLens-100K (history window 5) and reads
the per-step timings the trainer logs (`timing/generation_s`, `timing/scoring_s`, `step_time`) and its
peak resident memory (`memory/peak_rss_mb`). The first step also builds the catalog index and is
reported apart. Random weights have the speed of trained ones, so the larger shapes need no download.

Variants: `before` is the path of TRL's own generate and log-prob forward with LoRA dropout active (the
CPU recipe until December 2026); `after` is the current CPU recipe's (`disable_dropout`, RecPO's rollout
loop, the shared-prompt forward). `both` runs one after the other, so the gain shows in one run.
`--precision both` (the default) times each step with float32 base weights and then with bfloat16 ones
(`--precision` of recipes/recpo.py) where the CPU has bf16 matrix units, and prints the bf16 / float32 ratio;
`--reasoning both` (the default) times the RecPO step (with reasoning) and the no-reasoning step, which is
the CPU recipe's item warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench_out") / "step"

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen2.5-3b": (2048, 36, 16, 2, 11008, 151936),
    "tiny": (64, 2, 4, 2, 128, 151936),  # a smoke test of this script on a CPU
}


def qwen2_config(shape: str):
    """A transformers Qwen2Config of one of SHAPES."""
    from transformers import Qwen2Config

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    return Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=shape == "qwen2.5-0.5b",
        max_position_embeddings=32768,
    )


def random_model(shape: str, tokenizer: str | None = None) -> str:
    """Save a randomly initialised model of a real shape, with a tokenizer (default: the embedded one), once.

    A saved tokenizer folder (`--tokenizer`) lets this run where the embedded GGUF cannot be read, e.g. a GPU
    machine without the `gguf` package; any tokenizer whose ids fit the shape's vocabulary times the same.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    from recipes.modeling import EMBEDDED_MODEL, load_tokenizer

    folder = OUT / f"random-{shape}"
    if (folder / "config.json").exists():
        return str(folder)
    model = Qwen2ForCausalLM(qwen2_config(shape)).to(torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(tokenizer or EMBEDDED_MODEL).save_pretrained(folder)
    return str(folder)


def ensure_data() -> str:
    data = Path("data/ml-100k-w5")
    if not data.exists():
        subprocess.run(
            [sys.executable, "-m", "data_prep", "movielens", "--window-size", "5", "--out", str(data)],
            check=True,
        )
    return str(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks step", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", default="embedded", choices=["embedded", *SHAPES], help="model (default: embedded)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument(
        "--steps", type=int, default=4, help="training steps (default: 4; the first is set apart)"
    )
    parser.add_argument("--users", type=int, default=4, help="users per step (default: 4)")
    parser.add_argument("--generations", type=int, default=2, help="rollouts per user (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max new tokens per rollout (default: 16)")
    parser.add_argument("--cache-implementation", default=None, help="e.g. static (GPU)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder for the random shapes (default: the embedded one)"
    )
    parser.add_argument(
        "--variant",
        default="after",
        choices=["before", "after", "both"],
        help="which path to time (default: after, the CPU recipe's; both: before then after)",
    )
    parser.add_argument(
        "--reasoning",
        default="both",
        choices=["true", "false", "both"],
        help="true: the RecPO step; false: the no-reasoning (warm-up) step; both (default)",
    )
    parser.add_argument(
        "--precision",
        default="both",
        choices=["float32", "bfloat16", "both"],
        help="base weights (default: both, bfloat16 only where the CPU has bf16 matrix units)",
    )
    args = parser.parse_args(argv)
    variants = ["before", "after"] if args.variant == "both" else [args.variant]
    modes = ["true", "false"] if args.reasoning == "both" else [args.reasoning]
    precisions = precisions_to_time(args.precision)
    status, steady = 0, {}
    for mode in modes:
        for variant in variants:
            for precision in precisions:
                seconds = run_variant(args, variant, mode, precision)
                status |= seconds is None
                steady[(mode, variant, precision)] = seconds
    for (mode, variant, precision), seconds in steady.items():
        base = steady.get((mode, variant, "float32"))
        if precision != "float32" and seconds and base:
            kind = "RecPO step" if mode == "true" else "no-reasoning (warm-up) step"
            print(
                f"{kind} [{variant}]: {precision} {seconds:.2f}s / float32 {base:.2f}s = {seconds / base:.2f}x"
            )
    return status


def precisions_to_time(requested: str) -> list[str]:
    """float32, bfloat16 or both; bfloat16 is skipped (and said so) where the CPU lacks bf16 matrix units."""
    from recipes.precision import cpu_bf16_units

    if requested != "both":
        return [requested]
    if cpu_bf16_units() is None:
        print(
            "this CPU has no bf16 matrix units (AMX-BF16, AVX512-BF16): timing float32 only (the recipe's choice)"
        )
        return ["float32"]
    return ["float32", "bfloat16"]


VARIANTS = {
    "before": [
        "--lora_dropout", "0.05", "--disable_dropout", "false", "--fast_rollouts", "false",
        "--shared_prompt_forward", "false", "--recompute_prompts", "false",
    ],
    "after": [
        "--lora_dropout", "0.05", "--disable_dropout", "true", "--fast_rollouts", "true",
        "--shared_prompt_forward", "true", "--recompute_prompts", "false",
    ],
}  # fmt: skip


def run_variant(args: argparse.Namespace, variant: str, reasoning: str, precision: str) -> float | None:
    """Run the steps; print their split; return the steady step's mean seconds (None if none was logged)."""

    model = (
        "embedded/SmolLM2-135M-Instruct"
        if args.shape == "embedded"
        else random_model(args.shape, args.tokenizer)
    )
    output = (
        OUT / f"run-{args.shape}-{args.cache_implementation or 'dynamic'}-{variant}-{reasoning}-{precision}"
    )
    command = [
        sys.executable, "recipes/recpo.py",
        "--model_name_or_path", model, "--data_dir", ensure_data(), "--output_dir", str(output),
        "--max_steps", str(args.steps), "--num_generations", str(args.generations),
        "--per_device_train_batch_size", str(args.users * args.generations),
        "--max_completion_length", str(args.new_tokens), "--temperature", "1.0",
        "--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear",
        "--gradient_checkpointing", "false", "--eval_strategy", "no", "--save_strategy", "no",
        "--evaluate_before", "false", "--max_eval_users", "1", "--max_test_users", "1", "--evaluate_test", "false",
        "--logging_steps", "1", "--report_to", "none", "--log_completions", "false", "--item_batch_size", "64",
        "--bf16", str(args.bf16).lower(), "--reasoning", reasoning, "--precision", precision, *VARIANTS[variant],
    ]  # fmt: skip
    if args.cache_implementation:
        command += ["--cache_implementation", args.cache_implementation]
    started = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if variant == "before":  # transformers' own attention path: key/value heads repeated before attention
        env["TRANSFORMERS_SDPA_FORCE_GQA"] = "0"
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    state = (
        json.loads((output / "trainer_state.json").read_text())
        if (output / "trainer_state.json").exists()
        else None
    )
    if state is None:
        checkpoints = sorted(output.glob("checkpoint-*/trainer_state.json"))
        state = json.loads(checkpoints[-1].read_text()) if checkpoints else {"log_history": []}
    steps = [e for e in state["log_history"] if "step_time" in e]
    if not steps:
        print("no step timings were logged", file=sys.stderr)
        return None

    def split(entry):
        generation, scoring = entry.get("timing/generation_s", 0.0), entry.get("timing/scoring_s", 0.0)
        return entry["step_time"], generation, scoring, entry["step_time"] - generation - scoring

    print(
        f"[{variant}] model={args.shape} precision={precision} bf16={args.bf16} reasoning={reasoning} "
        f"users/step={args.users} "
        f"G={args.generations} new_tokens={args.new_tokens} cache={args.cache_implementation or 'dynamic'}"
    )
    first = split(steps[0])
    print(f"step 1 (builds the item index): total {first[0]:.2f}s  scoring {first[2]:.2f}s")
    rest = [split(e) for e in steps[1:]] or [first]
    total, generation, scoring, update = (statistics.mean(col) for col in zip(*rest, strict=True))
    print(f"steady step (mean of {len(rest)}): total {total:.2f}s")
    for name, value in (("generation", generation), ("scoring", scoring), ("update", update)):
        print(f"  {name:<11}{value:7.2f}s  {100 * value / total:5.1f}%")
    lengths = [e["completions/mean_length"] for e in steps[1:] or steps if "completions/mean_length" in e]
    if lengths and generation > 0:
        tokens = args.users * args.generations * statistics.mean(lengths)
        print(
            f"  rollouts: {tokens:.0f} new tokens per step, {tokens / generation:,.0f} tokens/s in generation"
        )
    peaks = [e[key] for e in steps for key in ("memory/peak_rss_mb", "memory/peak_gpu_mb") if key in e]
    if peaks:
        rss = max(e.get("memory/peak_rss_mb", 0.0) for e in steps)
        gpu = max(e.get("memory/peak_gpu_mb", 0.0) for e in steps)
        print(f"  peak resident memory {rss:,.0f} MB" + (f", peak GPU memory {gpu:,.0f} MB" if gpu else ""))
    print(f"wall time of the whole run (load, index, steps): {wall:.1f}s")
    return total


if __name__ == "__main__":
    raise SystemExit(main())
