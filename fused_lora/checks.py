"""Argument checks shared by the functional API, the module and the backends.

Every failure is a ``TypeError`` (wrong kind of object or dtype) or a
``ValueError`` (wrong value or shape) whose message names the argument and
says what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_SEED = 2 ** 63


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _require_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} {meaning}, got {tuple(tensor.shape)}")


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    return dropout_p


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int in [0, 2**63), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")
    return seed


def check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) and scaling.dim() == 0:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a finite real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite real number, got {scaling}")
    return scaling


def check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r: expected an int >= 1, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r}")
    return int(r)


def check_dims(rows, cols) -> tuple[int, int]:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return int(rows), int(cols)


def check_lora_inputs(x, weight, bias, lora_A, lora_B) -> None:
    """Shapes, dtypes and devices of the tensors of one LoRA linear call."""
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)

    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape (..., in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features < 1 or out_features < 1:
        raise ValueError(f"weight: expected in_features >= 1 and out_features >= 1, got shape {tuple(weight.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features} (weight's in_features), got shape {tuple(x.shape)}")
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A: expected a 2-D tensor (r, in_features), got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    _require_shape("lora_A", lora_A, (r, in_features), "(r, in_features)")
    _require_shape("lora_B", lora_B, (out_features, r), "(out_features, r) with r from lora_A")
    if bias is not None:
        _require_shape("bias", bias, (out_features,), "(out_features,)")

    for name, value in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {value.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (x's dtype), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected dtype {x.dtype} (x's dtype), got {bias.dtype}")
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    if lora_A.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"lora_A: expected dtype {names} for x of dtype {x.dtype}, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: expected dtype {lora_A.dtype} (lora_A's dtype), got {lora_B.dtype}")
