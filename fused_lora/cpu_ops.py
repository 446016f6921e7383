"""The "cpu" backend: thin wrappers over the C++ extension ``fused_lora._C``.

Same interface as ``fused_lora.torch_ops`` (see there). The C++ side (csrc/)
fuses the dropout into the shrink and into the dx / dA loops, regenerating the
Philox mask tile by tile, and accumulates the expand into the base GEMM's
output. The integer dropout threshold is computed here, by
``fused_lora.philox.dropout_threshold``, so its rounding is the same on every
backend. fp16 and bf16 inputs run the same path (LoRA branch in fp32).

The C++ loops run the best ISA level the CPU has (avx512, avx2 or baseline
x86-64; ``ISA``); the environment variable ``FUSED_LORA_ISA`` caps it (read once,
when the extension loads; an invalid value raises here).
"""

from __future__ import annotations

import torch

from . import _C  # type: ignore[attr-defined]
from .philox import dropout_threshold

_ENV_ERROR = _C.isa_env_error()
if _ENV_ERROR:
    raise ValueError(_ENV_ERROR)

ISA = _C.isa()
"""The ISA level of the C++ loops in this process: "avx512", "avx2" or "baseline"."""

# NOTE: the threshold of each p, computed once (dropout_threshold costs about a
# microsecond per call, a tenth of a whole tiny op).
_THRESHOLDS: dict[float, int] = {}


def _threshold(dropout_p: float) -> int:
    threshold = _THRESHOLDS.get(dropout_p)
    if threshold is None:
        threshold = _THRESHOLDS[dropout_p] = dropout_threshold(dropout_p)
    return threshold


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    mask = _C.keep_mask(seed, rows, cols, _threshold(dropout_p))
    return mask.to(device)


def random_uint16(seed: int, start: int, count: int) -> torch.Tensor:
    """The 16-bit values of flattened elements ``start .. start + count - 1`` (as ``philox.random_uint16``)."""
    return _C.random_uint16(seed, start, count)


# seed: an int or a 0-d int64 CPU tensor; the C++ side reads it only when dropout_p > 0.

def lora_shrink(x2d, lora_A, seed, dropout_p):
    return _C.lora_shrink(x2d, lora_A, seed, _threshold(dropout_p), dropout_p), None


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    return _C.lora_forward(x2d, weight, bias, lora_B, xa, scaling)


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    return _C.lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, _threshold(dropout_p),
                            dropout_p, needs_dx, needs_dA, needs_dB)
