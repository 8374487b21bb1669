"""Which dtype the frozen base weights are kept in: float32, or bfloat16 where the hardware multiplies it fast.

On a CPU the matrix products are most of a run's time (the item index is ~85% `aten::mm`). CPUs with bf16
matrix units multiply bfloat16 several times faster than float32: an Intel Xeon with AMX about 8x, a CPU with
AVX-512 BF16 but no AMX (AMD EPYC) about 2x, measured on SmolLM2's shapes. Autocast does not buy that on CPU
(it casts the float32 weights at every call, which costs more than it saves), so the bf16 path keeps the
*frozen base weights* in bfloat16 and everything that learns or decides in float32: the LoRA weights (peft
upcasts an adapter on a bf16 base to float32) and their optimizer state, the log-softmax of the token
log-probs (TRL's fused head projects in float32), the cosines, softmaxes, ranks and losses (every consumer
of a vector calls `.float()` first).

`precision`:
- `auto` (the CPU recipe's): on a CPU, bfloat16 where it has bf16 matrix units (AMX-BF16 or AVX512-BF16,
  read from the CPU's feature flags by torch, or /proc/cpuinfo), float32 elsewhere; on a GPU, the model's
  `dtype` field as given (the paper recipes: bfloat16).
- `float32` / `bfloat16`: that dtype, wherever the run is.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units: "AMX-BF16", "AVX512-BF16", or None where it has neither.

    torch's own CPU feature checks (cpuid) first; /proc/cpuinfo's flags where those are missing.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:
        # AMX needs the kernel's permission as well as the instructions: torch asks for it (and checks) here.
        init = getattr(torch.cpu, "_init_amx", None)
        if amx() and (init is None or init()):
            return "AMX-BF16"
        return "AVX512-BF16" if avx512_bf16() else None
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX-BF16"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_model() -> str:
    """The CPU's model name (for benchmark headers), or the platform's processor string."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@dataclass(frozen=True)
class Precision:
    """The dtype a run keeps its base weights in, and why (recorded in run_config.json)."""

    requested: str
    dtype: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def resolve_precision(requested: str, model_dtype: str | None, on_cpu: bool) -> Precision:
    """The base weights' dtype for `precision: requested` (see the module docstring).

    `model_dtype` is the model config's `dtype` (TRL's ModelConfig, default float32), which `auto` keeps on a
    GPU; on a CPU, `auto` keeps it only when it asks for something other than float32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        if requested == "bfloat16" and on_cpu and cpu_bf16_units() is None:
            logger.warning("precision bfloat16 on a CPU without bf16 matrix units: expect it to be slower")
        return Precision(requested, requested, "asked for")
    given = model_dtype if model_dtype not in (None, "auto") else "float32"
    if not on_cpu:
        return Precision(requested, given, f"on a GPU: the model's dtype ({given})")
    if given != "float32":
        return Precision(requested, given, f"the model's dtype ({given}) as given")
    units = cpu_bf16_units()
    if units is None:
        return Precision(requested, "float32", "this CPU has no bf16 matrix units (AMX-BF16, AVX512-BF16)")
    return Precision(requested, "bfloat16", f"this CPU has {units}")


def lean_lora(model: torch.nn.Module) -> int:
    """Run each plain LoRA adapter with fewer passes over the activations; returns the number of layers changed.

    peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the scaling multiplies, and the sum adds, whole
    (tokens, out) activations, forward and backward. Here the scaling is folded into B (out x r: small) and the
    sum is fused into B's product (`addmm`), so the adapter adds one product of width r to the base layer's output.
    The same values to float rounding (tests/recipes/test_precision.py).

    On a bf16 (or fp16) base, peft also upcasts the adapter to float32 and then, in every forward, casts the
    layer's input to float32 and the sum back: four passes over the activations per layer, which on a CPU cost
    more than the bf16 base matmul saves. Here the adapter's weights are cast to the base's dtype at each call
    (r x in and out x r: small), the adapter runs in that dtype beside the base layer, and autograd casts its
    weight gradients back to float32 (the weights, their gradients and the optimizer state stay float32).

    Layers with another variant (DoRA...), a bias on B (`lora_bias`), adapters in another dtype than float32 or the
    base's, merged or disabled adapters, and mixed-adapter batches keep peft's own forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.get_base_layer().weight
        # DoRA and other variants, and a bias on B (peft's lora_bias, which it scales too), keep peft's forward
        variant = getattr(module, "lora_variant", {})
        plain = not variant and all(module.lora_B[name].bias is None for name in module.lora_B)
        dtypes_ok = base.dtype in (torch.float32, torch.bfloat16, torch.float16) and all(
            module.lora_A[name].weight.dtype in (torch.float32, base.dtype) for name in module.lora_A
        )
        if not (plain and dtypes_ok):
            continue
        module.forward = types.MethodType(_lean_lora_forward, module)
        changed += 1
    return changed


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    dtype, shape = result.dtype, result.shape
    x = x.to(dtype)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a = self.lora_A[name].weight.to(dtype)  # (r, in)
        b = (self.lora_B[name].weight * self.scaling[name]).to(dtype)  # (out, r)
        low = torch.nn.functional.linear(self.lora_dropout[name](x), a)  # (..., r)
        # result + low @ b.T as one product: no (tokens, out) temporaries, and only low and b kept for the backward
        result = torch.addmm(result.reshape(-1, shape[-1]), low.reshape(-1, low.shape[-1]), b.t()).view(shape)
    return result
