"""Launchers of the "triton" backend: check, allocate, pick the plan, launch.

Same operation interface as ``fused_lora.ops.torch_ops``. Runs on CUDA tensors, and
on CPU tensors under ``TRITON_INTERPRET=1``. The kernels live in the top-level
``kernels/`` folder, installed as ``fused_lora.kernels``.

The host path is the hot path for small inputs, so everything that depends only
on shapes, strides, dtypes and flags is computed once per call signature and
cached in a *plan*: the grids, the constexprs, the chosen config and, on a GPU,
the compiled kernel itself. A later call with the same signature is one
dictionary lookup, the output allocations and one launch per kernel
(``_Launch``, which calls Triton's compiled launcher directly, as Triton's own
``JITFunction.run`` does after its cache lookup).

The two GEMMs (forward y, backward dx) have several strategies: the persistent
TMA kernels (sm_90+, 16-bit, aligned rows), the pointer kernels (any GPU, any
strides, the interpreter) and the cuBLAS hybrid (a Triton kernel writes the
low-rank term, then ``addmm_`` adds the base GEMM into it). Each shape class (T
rounded up to a power of two) takes the strategy and tile shape that the tuning file
names (``python -m bench.tune`` writes it; ``tuning_file.py``), else the heuristic
default; no training process times candidates, so every process and rank runs the
same kernels (``FUSED_LORA_AUTOTUNE=0``: the file is not read, heuristic defaults).

The dropout mask reaches backward as packed keep bits written by the shrink
(``backends.TRITON_MASK_MODE = "bits"``: T * ceil(K/8) extra bytes saved) or is
regenerated from the seed (``"seed"``); ``FUSED_LORA_DROPOUT_MASK`` chooses.

Layout: ``launch`` (the cheap launcher and device facts), ``tuning`` (configs and the
strategy choice), ``tuning_file`` (the choices written ahead of time), ``plans``
(per-signature plans); this module holds the operations.
"""

from __future__ import annotations

import torch
import triton

from ...kernels.dropout_mask import _dropout_mask_kernel, _unpack_keep_bits_kernel
from ...philox import dropout_threshold
from ..backends import saves_keep_bits
from .dequant import dequantize_4bit  # noqa: F401
from .forward_4bit import lora_forward_4bit  # noqa: F401  (optional, not a default: see its module)
from .launch import _aligned, _grid_device, _Launch, _seed_tensor, accumulation_dtype, autotuning, force_tma  # noqa: F401
from .plans import (PLAN_CACHE_SIZE, _BACKWARD_PLANS, _FORWARD_PLANS, _SHRINK_PLANS, _BackwardPlan,  # noqa: F401
                    _ForwardPlan, _ShrinkPlan, clear_plans, plan_count)
from .tuning import (CONFIG_OVERRIDES, TMA_MAX_RANK_BLOCK, TUNED_POINTER, TUNED_TMA, timing_runs,  # noqa: F401
                     tuned_choices, tuning_report)


def keep_mask(seed, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    device = torch.device(device)
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if rows and cols:
        block_m, block_k = 32, 64
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
        launch = _Launch(_dropout_mask_kernel, grid, dict(K_ALIGNED=cols % 8 == 0, BLOCK_M=block_m, BLOCK_K=block_k),
                         device_index=_grid_device(device))
        launch(out, _seed_tensor(seed, device), rows, cols, dropout_threshold(dropout_p))
    return out.view(torch.bool)


def unpack_keep_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Bool (rows, cols) keep mask from packed keep bits (what the shrink saves in ``"bits"`` mode)."""
    rows = bits.shape[0]
    out = torch.empty((rows, cols), dtype=torch.uint8, device=bits.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 64))
        _Launch(_unpack_keep_bits_kernel, grid, dict(BLOCK_M=32, BLOCK_K=64),
                device_index=_grid_device(bits.device))(out, bits, rows, cols, bits.stride(0))
    return out.view(torch.bool)



def lora_shrink(x2d, lora_A, seed, dropout_p):
    """``(xa, keep_bits)``: xa = D(x) A^T (T, r) in the accumulation dtype; keep_bits the packed
    mask (T, ceil(K/8)) uint8 when dropout is on and the mask mode is "bits", else None."""
    store_bits = saves_keep_bits("triton", dropout_p, x2d.dtype)
    key = (x2d.device, x2d.dtype, lora_A.dtype, x2d.shape, x2d.stride(), lora_A.shape, lora_A.stride(),
           _aligned(x2d), _aligned(lora_A), dropout_p, store_bits, torch.backends.cuda.matmul.allow_tf32)
    plan = _SHRINK_PLANS.get(key)
    if plan is None:
        plan = _SHRINK_PLANS.put(key, _ShrinkPlan(x2d, lora_A, dropout_p, store_bits))
    if dropout_p > 0.0 and not (isinstance(seed, torch.Tensor) and seed.device == x2d.device and _aligned(seed)):
        seed = _seed_tensor(seed, x2d.device)
    return plan(x2d, lora_A, seed if dropout_p > 0.0 else None)



def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    if bias is not None and bias.stride(0) != 1:
        # NOTE: the kernels index the bias as bias_ptr + n; an expanded (stride 0) or strided
        # bias (N elements, a few KB) is copied rather than read at the wrong addresses.
        bias = bias.contiguous()
    key = (x2d.device, x2d.dtype, lora_B.dtype, x2d.shape, x2d.stride(), weight.stride(), lora_B.shape,
           lora_B.stride(), xa.stride(), bias is None or _aligned(bias), bias is None, _aligned(x2d), _aligned(weight),
           _aligned(lora_B), scaling, torch.backends.cuda.matmul.allow_tf32)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.put(key, _ForwardPlan(x2d, weight, bias, lora_B, xa, scaling))
    return plan(x2d, weight, bias, lora_B, xa)



def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    """``(dx, dA, dB)``, None for what is not needed. ``keep_bits``: the packed mask the shrink
    saved (None: the mask is regenerated from ``seed``)."""
    from_bits = dropout_p > 0.0 and keep_bits is not None
    key = (dy.device, dy.dtype, lora_A.dtype, lora_B.dtype, dy.shape, dy.stride(), weight.shape, weight.stride(),
           lora_A.shape, lora_A.stride(), lora_B.stride(), xa.stride(), None if x2d is None or not needs_dA else x2d.stride(),
           _aligned(dy), _aligned(weight), _aligned(lora_A), _aligned(lora_B),
           x2d is None or _aligned(x2d), scaling, dropout_p, from_bits, needs_dx, needs_dA, needs_dB,
           torch.backends.cuda.matmul.allow_tf32)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.put(key, _BackwardPlan(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p,
                                                      from_bits, needs_dx, needs_dA, needs_dB))
    if dropout_p > 0.0 and not from_bits and not (isinstance(seed, torch.Tensor) and seed.device == dy.device
                                                  and _aligned(seed)):
        seed = _seed_tensor(seed, dy.device)
    return plan(dy, x2d, weight, lora_A, lora_B, xa, seed if dropout_p > 0.0 and not from_bits else None,
                keep_bits if from_bits else None)
