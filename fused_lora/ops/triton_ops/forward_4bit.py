"""``lora_forward_4bit``: forward step 2 on a 4-bit base with W dequantized inside the GEMM.

Same contract as ``lora_forward(x2d, W, bias, lora_B, xa, scaling)`` with ``W`` the
dequantized (N, K) weight in x's dtype, but W is read as its 4-bit bytes (0.5 byte per
element) and never written: for short inputs (decode, small batches), where reading W
bounds the GEMM, that is up to ~4x fewer bytes than a bf16 copy plus the copy's own
write. The kernel is ``kernels/triton/lora_fwd_4bit.py``.

NOT a default: it is tested (interpreter) and compiled for sm_90, but no GPU has timed
it against dequantize-into-a-buffer + the dense GEMMs; the integrator routes short T here
only after a GPU measurement says it is faster.
"""

from __future__ import annotations

import torch
import triton

from ...kernels.common import rank_block
from ...kernels.lora_fwd_4bit import _lora_fwd_4bit_kernel
from .dequant import _checked_weight, _weight_arguments, _weight_key, _weight_layout, weight_constexprs
from .launch import _aligned, _columns_fit_int32, _grid_device, _input_precision, _Launch, _lora_precision
from .plans import _PlanCache

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FORWARD_4BIT_PLANS = _PlanCache(256)


def forward_4bit_config(T: int, blocksize: int, K: int, element_size: int) -> dict:
    """Tile shape: 16 rows for decode, else 32 (this kernel is for short inputs); BLOCK_K within one
    quantization block. fp32 inputs take 32 x 32 (W tile) steps: an exact fp32 dot is FMAs in
    registers, and 64 x 64 spills on sm_90."""
    wide = 64 if element_size == 2 else 32
    return dict(BLOCK_M=16 if T <= 16 else 32, BLOCK_N=wide, BLOCK_K=min(wide, blocksize), GROUP_M=8,
                ABSMAX_PER_COLUMN=K % blocksize == 0)


def forward_4bit_launch_options(blocksize: int, quant_type: str, nested: bool, nested_blocksize: int,
                                offset_from_ptr: bool, has_bias: bool, input_precision: str, lora: dict,
                                block_r: int, config: dict) -> tuple[dict, dict]:
    """(constexprs, launch options); also what tools/compile_kernels.py compiles. ``lora``: the LoRA
    expand's LORA_FP32 and LORA_PRECISION (``launch._lora_precision(x dtype, lora_B dtype, gemm=True)``,
    as for ``lora_forward``'s GEMM)."""
    constexprs = dict(weight_constexprs(blocksize, quant_type, nested, nested_blocksize, offset_from_ptr),
                      HAS_BIAS=has_bias, INPUT_PRECISION=input_precision, **lora, BLOCK_R=block_r, **config)
    # NOTE: no FMA contraction, as in dequantize_4bit: the nested absmax keeps two roundings.
    return constexprs, dict(num_warps=4, num_stages=2, enable_fp_fusion=False)


def _check_operands(x2d, weight_shape, bias, lora_B, xa, device):
    N, K = weight_shape
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2 or x2d.shape[1] != K or x2d.dtype not in X_DTYPES:
        raise ValueError(f"x2d: expected a 2-D float16, bfloat16 or float32 tensor with {K} columns, got "
                         f"{getattr(x2d, 'dtype', type(x2d).__name__)} of shape {tuple(getattr(x2d, 'shape', ()))}")
    T = x2d.shape[0]
    if not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 2 or lora_B.shape[0] != N:
        raise ValueError(f"lora_B: expected a 2-D tensor with {N} rows, got shape "
                         f"{tuple(getattr(lora_B, 'shape', ()))}")
    R = lora_B.shape[1]
    if not isinstance(xa, torch.Tensor) or tuple(xa.shape) != (T, R) or xa.dtype != torch.float32:
        raise ValueError(f"xa: expected a float32 tensor of shape {(T, R)}, got "
                         f"{getattr(xa, 'dtype', None)} of shape {tuple(getattr(xa, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias: expected None or a tensor of shape ({N},), got shape "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("x2d", x2d), ("lora_B", lora_B), ("xa", xa), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the packed weight's device), got {t.device}")
    return T, N, K, R


def lora_forward_4bit(x2d, weight, bias, lora_B, xa, scaling: float) -> torch.Tensor:
    """y (T, N) in x's dtype = x2d W^T + bias + scaling * xa lora_B^T, W the dequantized 4-bit ``weight``
    (the contract's ``Weight4bit``) rounded to x's dtype; xa (T, R) fp32 from ``lora_shrink``."""
    packed, n, offset_tensor, offset = _checked_weight(weight)
    T, N, K, R = _check_operands(x2d, tuple(weight.shape), bias, lora_B, xa, packed.device)
    if not _columns_fit_int32(x2d):  # the kernel indexes columns in 32 bits (launch._columns_fit_int32)
        x2d = x2d.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    y = torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)
    if T == 0 or N == 0:
        return y
    precision = _input_precision(x2d.dtype)
    key = (x2d.device, x2d.dtype, lora_B.dtype, bias is None or bias.dtype, T, N, K, R, x2d.stride(), lora_B.stride(),
           xa.stride(), _aligned(x2d), _aligned(lora_B), _aligned(xa), bias is None or _aligned(bias), _aligned(y),
           precision) + _weight_key(weight, packed, offset_tensor)
    plan = _FORWARD_4BIT_PLANS.get(key)
    if plan is None:
        config = forward_4bit_config(T, weight.blocksize, K, x2d.element_size())
        lora = _lora_precision(x2d.dtype, lora_B.dtype, gemm=True)
        constexprs, options = forward_4bit_launch_options(*_weight_layout(weight, offset_tensor), bias is not None,
                                                          precision, lora, rank_block(R), config)
        grid = (triton.cdiv(T, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        plan = _FORWARD_4BIT_PLANS.put(key, _Launch(_lora_fwd_4bit_kernel, grid, constexprs, options,
                                                    device_index=_grid_device(x2d.device)))
    plan(x2d, *_weight_arguments(weight, packed, offset_tensor), bias if bias is not None else y, xa, lora_B, y,
         T, N, K, R, offset, x2d.stride(0), x2d.stride(1), xa.stride(0), xa.stride(1), lora_B.stride(0),
         lora_B.stride(1), y.stride(0), y.stride(1), float(scaling))
    return y
