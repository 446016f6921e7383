"""The "cpu" backend: thin wrappers over the C++ extension ``fused_lora._C``.

Same interface as ``fused_lora.torch_ops`` (see there). The C++ side (csrc/)
fuses the dropout into the shrink and into the dx / dA loops, regenerating the
Philox mask tile by tile, and accumulates the expand into the base GEMM's
output. The integer dropout threshold is computed here, by
``fused_lora.philox.dropout_threshold``, so its rounding is the same on every
backend. fp16 and bf16 inputs run the same path (LoRA branch in fp32).
"""

from __future__ import annotations

import torch

from . import _C  # type: ignore[attr-defined]
from .philox import dropout_threshold


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    mask = _C.keep_mask(seed, rows, cols, dropout_threshold(dropout_p))
    return mask.to(device)


def random_uint16(seed: int, start: int, count: int) -> torch.Tensor:
    """The 16-bit values of flattened elements ``start .. start + count - 1`` (as ``philox.random_uint16``)."""
    return _C.random_uint16(seed, start, count)


def lora_shrink(x2d, lora_A, seed, dropout_p):
    seed = int(seed) if dropout_p > 0.0 else 0
    return _C.lora_shrink(x2d, lora_A, seed, dropout_threshold(dropout_p), dropout_p), None


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    return _C.lora_forward(x2d, weight, bias, lora_B, xa, scaling)


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    seed = int(seed) if dropout_p > 0.0 else 0
    return _C.lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_threshold(dropout_p),
                            dropout_p, needs_dx, needs_dA, needs_dB)
