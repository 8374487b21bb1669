"""RMSNorm and the SwiGLU product with hand-written backward passes that keep fewer activations.

What autograd keeps for the backward pass of a bf16 training step is mostly the decoder's intermediate values,
and two of them are kept twice over. transformers' RMSNorm casts its input to float32 and autograd keeps that
float32 copy (twice the bytes of the bf16 input); the MLP's `act_fn(gate) * up` keeps the gate, its SiLU and the
up projection. Measured on the CPU default (SmolLM2-135M in bf16 with LoRA on every projection, a warm-up-sized
batch of 4 user and 4 item prompts): 775 MB of activations, of which the norms' float32 copies are 124 MB and the SiLU outputs
83 MB. The functions below compute the same forward with the same operations in the same order (bit for bit:
tests/recipes/test_saved_activations.py) and keep the bf16 input and the per-token reciprocal RMS (norm), or the
gate and up projections (SwiGLU), recomputing the rest in the backward pass.

`keep_fewer_activations(model)` switches every RMSNorm and SiLU-gated MLP of the families it knows (Llama, Qwen2,
Qwen3, Mistral: the same code in transformers) to them; any other module keeps its own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm, operation for operation, and the reciprocal RMS it used. (..., d), (..., 1)"""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) with the normalisation in float32, as transformers computes it;
    keeps x in its own dtype and rsqrt (one float per token) instead of a float32 copy of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd  # (..., d)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)) over the last dimension
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.numel()).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only (autograd would also keep silu(gate))."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # the kernel autograd itself would run
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)  # recomputed: the one value this function does not keep
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm; keeps fewer activations where gradient flows."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_forward(x, weight, eps)[0]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; keeps fewer activations where gradient flows."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def keep_fewer_activations(model: nn.Module) -> int:
    """Switch the model's RMSNorms and SiLU-gated MLPs (families in NORM_CLASSES / MLP_CLASSES) to the functions
    above, in place; returns the number of modules switched. Other modules, and MLPs with another activation,
    keep their own forward."""
    switched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            switched += 1
        elif name in MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            switched += 1
    return switched
