"""Launchers of the "triton" backend: check, allocate, pick the grid, launch.

Same operation interface as ``fused_lora.torch_ops``. Runs on CUDA tensors, and
on CPU tensors under ``TRITON_INTERPRET=1``. The kernels live in the top-level
``kernels/`` folder, installed as ``fused_lora.kernels``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from .kernels.common import dy_pass_blocks, launch_gemm, lowrank_blocks
from .kernels.dropout_mask import _dropout_mask_kernel
from .kernels.lora_bwd import DX_TILES, _lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_dy_kernel
from .kernels.lora_fwd import FWD_TILES, _lora_fwd_kernel
from .kernels.lora_shrink import _lora_shrink_kernel
from .philox import dropout_threshold
from .torch_ops import accumulation_dtype



def _split_float(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo representable in fp32 (Triton passes floats as fp32)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow PyTorch's own TF32 switch (off by default), like torch.mm;
    # fp64 is always exact; fp16/bf16 keep Triton's default (the flag only affects fp32).
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _dropout_args(seed: int, dropout_p: float, in_features: int) -> dict:
    scale_hi, scale_lo = _split_float(1.0 / (1.0 - dropout_p))
    return dict(seed=seed, threshold=dropout_threshold(dropout_p),
                dropout_scale_hi=scale_hi, dropout_scale_lo=scale_lo,
                HAS_DROPOUT=dropout_p > 0.0, K_ALIGNED=in_features % 8 == 0)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one after another


def _with_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    device = torch.device(device)
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if rows and cols:
        block_m, block_k = 32, 64
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
        with _with_device(device):
            _dropout_mask_kernel[grid](out, rows, cols, seed, dropout_threshold(dropout_p),
                                       K_ALIGNED=cols % 8 == 0, BLOCK_M=block_m, BLOCK_K=block_k)
    return out.view(torch.bool)


def lora_shrink(x2d, lora_A, seed, dropout_p):
    T, K = x2d.shape
    R = lora_A.shape[0]
    xa = torch.empty((T, R), dtype=accumulation_dtype(x2d.dtype), device=x2d.device)
    block_r, block = lowrank_blocks(R, x2d.element_size())
    grid = (triton.cdiv(T, block),)
    with _with_device(x2d.device):
        _lora_shrink_kernel[grid](
            x2d, lora_A, xa, T, K, R,
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
            **_dropout_args(seed, dropout_p, K),
            IS_FP64=x2d.dtype == torch.float64, INPUT_PRECISION=_input_precision(x2d.dtype),
            BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r,
        )
    return xa


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    T, K = x2d.shape
    N, R = lora_B.shape
    y = torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)
    scaling_hi, scaling_lo = _split_float(scaling)
    block_r = lowrank_blocks(R, x2d.element_size())[0]

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with _with_device(x2d.device):
        launch_gemm(
            _lora_fwd_kernel, FWD_TILES, x2d, block_r, grid,
            x2d, weight, bias if bias is not None else weight, xa, lora_B, y,
            T, N, K, R,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            scaling_hi, scaling_lo,
            HAS_BIAS=bias is not None, IS_FP64=x2d.dtype == torch.float64,
            INPUT_PRECISION=_input_precision(x2d.dtype), BLOCK_R=block_r,
        )
    return y


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p,
                  needs_dx, needs_dA, needs_dB):
    T, N = dy.shape
    R, K = lora_A.shape
    device, dtype = dy.device, dy.dtype
    acc_dtype = accumulation_dtype(dtype)
    is_fp64 = dtype == torch.float64
    precision = _input_precision(dtype)
    block_r, block = lowrank_blocks(R, dy.element_size())
    scaling_hi, scaling_lo = _split_float(scaling)
    needs_dxa = needs_dx or needs_dA
    dx = dA = dB = None

    with _with_device(device):
        # Step 3: one read of dy for dxa = dy B and the dB partials.
        dxa = torch.empty((T, R), dtype=acc_dtype, device=device) if needs_dxa else xa
        dy_block_m, dy_block_n, dy_warps = dy_pass_blocks(R, dy.element_size())
        num_row_blocks = triton.cdiv(T, dy_block_m)
        db_partial = (torch.empty((num_row_blocks, N, R), dtype=acc_dtype, device=device)
                      if needs_dB else xa.new_empty((1, 1, 1)))
        _lora_bwd_dy_kernel[(num_row_blocks,)](
            dy, lora_B, xa, dxa, db_partial, T, N, R,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
            dxa.stride(0), dxa.stride(1), db_partial.stride(0), db_partial.stride(1), db_partial.stride(2),
            NEEDS_DXA=needs_dxa, NEEDS_DB=needs_dB, IS_FP64=is_fp64, INPUT_PRECISION=precision,
            BLOCK_M=dy_block_m, BLOCK_N=dy_block_n, BLOCK_R=block_r, num_warps=dy_warps,
        )
        if needs_dB:
            # NOTE: second, deterministic stage of the reduction over T (no atomics).
            dB = db_partial.sum(dim=0).mul_(scaling).to(lora_B.dtype)

        dropout = _dropout_args(seed, dropout_p, K)
        if needs_dx:
            # Step 4: dx = dy W + scaling * D(dxa A).
            dx = torch.empty((T, K), dtype=dtype, device=device)

            def grid(meta):
                return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

            launch_gemm(
                _lora_bwd_dx_kernel, DX_TILES, dy, block_r, grid,
                dy, weight, dxa, lora_A, dx, T, N, K, R,
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dxa.stride(0), dxa.stride(1),
                lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
                scaling_hi, scaling_lo, **dropout,
                IS_FP64=is_fp64, INPUT_PRECISION=precision, BLOCK_R=block_r,
            )

        if needs_dA:
            # Step 5: dA = scaling * dxa^T D(x), split over T for parallelism.
            num_k_blocks = triton.cdiv(K, block)
            row_blocks = triton.cdiv(T, block)
            splits = max(1, min(row_blocks, _target_programs(device) // num_k_blocks))
            rows_per_split = triton.cdiv(row_blocks, splits) * block
            splits = triton.cdiv(T, rows_per_split)
            da_partial = torch.empty((splits, R, K), dtype=acc_dtype, device=device)
            _lora_bwd_da_kernel[(num_k_blocks, splits)](
                dxa, x2d, da_partial, T, K, R, rows_per_split,
                dxa.stride(0), dxa.stride(1), x2d.stride(0), x2d.stride(1),
                da_partial.stride(0), da_partial.stride(1), da_partial.stride(2),
                **dropout, IS_FP64=is_fp64, INPUT_PRECISION=precision,
                BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r,
            )
            dA = da_partial.sum(dim=0).mul_(scaling).to(lora_A.dtype)
    return dx, dA, dB
