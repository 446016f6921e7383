"""Eager reference implementation: the ground truth every backend is tested against.

Plain PyTorch with autograd doing the backward, in the style of PEFT's
``lora.Linear``: the base GEMM in x's dtype, the LoRA branch in the adapters'
dtype (PEFT keeps adapters in fp32 for half-precision bases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_dropout_p, check_lora_inputs, check_scaling
from .quantized import dequantize, is_params_4bit


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                          keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``y = x W^T + b + scaling * (D(x) A^T) B^T``, differentiable by autograd.

    ``keep_mask``: bool tensor of the flattened input shape ``(T, K)``,
    ``T = x.numel() // K``; True keeps an element. ``D(x) = x * keep_mask / (1 - dropout_p)``.
    With ``keep_mask=None`` no dropout is applied (as in eval mode), whatever ``dropout_p``.

    ``weight`` may be a bitsandbytes 4-bit ``Params4bit`` (or a ``fused_lora.quantized.Weight4bit``):
    it is dequantized to a new dense tensor in x's dtype (through the quant_state's dtype, as
    bitsandbytes' matmul does; the pure-PyTorch dequantization, bit-exact against bitsandbytes'
    ``dequantize_4bit``), then the formula runs on it.
    """
    if is_params_4bit(weight):  # a Params4bit or a Weight4bit
        dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else None
        weight = dequantize(weight, dtype, backend="torch")
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    scaling = check_scaling(scaling)
    dropout_p = check_dropout_p(dropout_p)
    in_features = weight.shape[1]
    x2d = x.reshape(-1, in_features)
    lora_input = x2d
    if keep_mask is not None:
        if not isinstance(keep_mask, torch.Tensor) or keep_mask.dtype != torch.bool:
            raise TypeError("keep_mask: expected a bool tensor")
        if tuple(keep_mask.shape) != tuple(x2d.shape):
            raise ValueError(f"keep_mask: expected shape {tuple(x2d.shape)} (T, K), got {tuple(keep_mask.shape)}")
        lora_input = x2d * keep_mask.to(x.device) / (1.0 - dropout_p)
    base = F.linear(x2d, weight, bias)
    lora = F.linear(F.linear(lora_input.to(lora_A.dtype), lora_A), lora_B) * scaling
    out = (base + lora).to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])
