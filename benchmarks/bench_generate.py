"""Where rollout-generation time goes: `model.generate` over precision, LoRA, stop strings, cache, compile.

    python -m benchmarks generate -- --shape qwen2.5-0.5b               # a GPU, all variants
    python -m benchmarks generate -- --shape tiny --prompts 4 --prompt-tokens 32 --new-tokens 8  # CPU smoke test

Each variant builds a randomly initialised model of a real shape in memory (same seed, so the same weights;
random weights decode as fast as trained ones) and times `model.generate` on random prompt ids of one
length, sampling as the trainer does (temperature 1.0, top-k 50). `min_new_tokens` equals `max_new_tokens`,
so every variant decodes exactly the same number of tokens whatever it samples. The variants go from what
the trainer does now (float32 weights, an unmerged peft LoRA on every linear layer, a stop string) towards
a bfloat16 model with its adapters merged, a static cache and a compiled decoding step, so the difference
between two neighbouring lines is the cost of one choice. Reported: the best of `--repeats` timed calls,
new tokens per second, wall time per decoding step (prefill included), peak GPU memory and the time of
the untimed warm-up call (for a compiled variant, mostly the compile).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from dataclasses import dataclass

from benchmarks.bench_step import SHAPES, qwen2_config


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool  # model weights in bfloat16 (else float32)
    lora: bool  # an unmerged peft LoRA adapter on every linear layer
    stop: bool = False  # stop_strings=["<answer>"] with the tokenizer, as recipes/evaluation.py binds them
    autocast: bool = False  # generate inside bf16 autocast
    static: bool = False  # cache_implementation="static"
    compiled: bool = False  # let transformers compile the decoding step (needs CUDA and a static cache)

    @property
    def needs_cuda(self) -> bool:
        return self.autocast or self.compiled


VARIANTS = [
    Variant("fp32-lora", bf16=False, lora=True),
    Variant("fp32-lora-stop", bf16=False, lora=True, stop=True),
    Variant("fp32-lora-autocast", bf16=False, lora=True, autocast=True),
    Variant("bf16-lora", bf16=True, lora=True),
    Variant("bf16-plain", bf16=True, lora=False),
    Variant("bf16-plain-static", bf16=True, lora=False, static=True),
    Variant("bf16-plain-static-compiled", bf16=True, lora=False, static=True, compiled=True),
    Variant("bf16-lora-static-compiled", bf16=True, lora=True, static=True, compiled=True),
]
STOP_STRING = "<answer>"
SEED = 0


def random_model(shape: str, variant: Variant, device):
    """A randomly initialised model of `shape` (seeded, so every variant gets the same weights), on `device`.

    Built on the device directly: a 3B model initialised on the CPU takes longer than all the timings.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(shape))
    if variant.bf16:
        model = model.to(torch.bfloat16)
    if variant.lora:
        from peft import LoraConfig, get_peft_model

        # As the recipes' `--use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear`. peft's
        # default autocast_adapter_dtype keeps the adapter weights in float32 on a bfloat16 model, as the
        # trainer would get them.
        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
    return model.eval()


def timed_generate(model, prompts, config, extra: dict, autocast: bool) -> tuple[float, int]:
    """Seconds of one `generate` call and the number of new tokens per prompt it produced."""
    import torch

    cuda = prompts.device.type == "cuda"
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad(), context:
        output = model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config, **extra
        )
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, output.shape[1] - prompts.shape[1]


def run_variant(variant: Variant, args, tokenizer, prompts) -> str:
    import torch
    from transformers import GenerationConfig

    device = prompts.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = random_model(args.shape, variant, device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def config(new_tokens: int) -> GenerationConfig:
        # The trainer's sampling settings (TRL 1.16 GRPOTrainer); eos is suppressed by min_new_tokens.
        return GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=[STOP_STRING] if variant.stop else None,
            cache_implementation="static" if variant.static else None,
            disable_compile=not variant.compiled,
        )

    extra = {"tokenizer": tokenizer} if variant.stop else {}
    try:
        # A compiled variant warms up at full length: the static cache (and so the compiled graph) is
        # sized for prompt + new tokens, and a short warm-up would compile a second, unused graph.
        warm_up = args.new_tokens if variant.compiled else min(8, args.new_tokens)
        warm_seconds, _ = timed_generate(model, prompts, config(warm_up), extra, variant.autocast)
        seconds, produced = min(
            timed_generate(model, prompts, config(args.new_tokens), extra, variant.autocast)
            for _ in range(args.repeats)
        )
        tokens = prompts.shape[0] * produced
        line = (
            f"{variant.name:<28}{seconds:8.2f}s{tokens / seconds:12,.0f} tok/s"
            f"{1000 * seconds / max(produced, 1):10.1f} ms/step"
        )
        if cuda:
            line += f"{torch.cuda.max_memory_allocated() / 2**30:9.2f} GiB"
        line += f"  warm-up {warm_seconds:.1f}s"  # for a compiled variant: the compile time
        if produced != args.new_tokens:
            line += f"  (only {produced} new tokens: a stop string ended every row)"
        return line
    finally:
        del model
        gc.collect()
        if variant.compiled:
            torch._dynamo.reset()  # drop the compiled graphs (and their CUDA graph pools) with the model
        if cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    names = [v.name for v in VARIANTS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (default: tiny)")
    parser.add_argument(
        "--prompts",
        type=int,
        default=64,
        help="prompts per generate call (default: 64 = 16 users x 4 rollouts)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default: 256)")
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="new tokens per prompt, exactly (default: 128)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2 tokenizer)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(names),
        help=f"comma-separated variants to run (default: all): {', '.join(names)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls per variant; the best is kept (default: 2)"
    )
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected a comma-separated subset of {names}")
    if min(args.prompts, args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        parser.error("--prompts, --prompt-tokens, --new-tokens and --repeats must each be at least 1")

    import peft
    import torch
    import transformers

    from recipes.modeling import EMBEDDED_MODEL, load_tokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(
        f"device {torch.cuda.get_device_name() if cuda else f'cpu ({torch.get_num_threads()} threads)'}  "
        f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}"
    )
    tokenizer = load_tokenizer(args.tokenizer or EMBEDDED_MODEL)
    vocab = min(tokenizer.vocab_size, SHAPES[args.shape][-1])
    prompts = torch.randint(
        0, vocab, (args.prompts, args.prompt_tokens), generator=torch.Generator().manual_seed(SEED)
    ).to(device)  # (prompts, prompt_tokens)
    print(
        f"shape {args.shape}  {args.prompts} prompts x {args.prompt_tokens} tokens -> {args.new_tokens} new tokens"
        f"  best of {args.repeats}"
    )
    started = time.perf_counter()
    for variant in (v for v in VARIANTS if v.name in chosen):
        if variant.needs_cuda and not cuda:
            print(f"{variant.name:<28}skipped (needs CUDA)", flush=True)
            continue
        try:
            print(run_variant(variant, args, tokenizer, prompts), flush=True)
        except Exception as error:  # one variant failing (e.g. a compile error) should not hide the others
            message = " ".join(str(error).split())[:300]
            print(f"{variant.name:<28}failed: {type(error).__name__}: {message}", flush=True)
    print(f"wall time of all variants (builds and warm-ups included): {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
