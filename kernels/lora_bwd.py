"""Backward: the dy pass (dxa, dB partials), the dx GEMM with the masked expand, dA partials.

Kernel plan steps 3-5 of DESIGN.md. Reductions over T (dB, dA) write one
partial per block of rows; the launcher sums them in a fixed order, so
results are bit-identical run to run (no atomics).
"""

import triton
import triton.language as tl

from .common import _grouped_tile, _scalar, _zeros_acc, gemm_configs, shared_memory_pruner
from .dropout_mask import _keep_tile


@triton.jit
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr,          # (T, N) upstream gradient
    b_ptr,           # (N, R) lora_B
    xa_ptr,          # (T, R) saved shrink output, fp32 / fp64
    dxa_ptr,         # (T, R) output dxa = dy B, fp32 / fp64 (written if NEEDS_DXA)
    db_partial_ptr,  # (cdiv(T, BLOCK_M), N, R) output dy^T xa per row block (written if NEEDS_DB)
    # sizes
    T, N, R,
    # strides
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    stride_dxam, stride_dxar,
    stride_pb, stride_pn, stride_pr,
    # meta-parameters
    NEEDS_DXA: tl.constexpr, NEEDS_DB: tl.constexpr, IS_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program: BLOCK_M rows of dy, read once for both dxa and this block's dB partial."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_r = offs_r < R
    dot_dtype = dy_ptr.dtype.element_ty
    dxa = _zeros_acc(BLOCK_M, BLOCK_R, IS_FP64)
    if NEEDS_DB:
        xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(dot_dtype)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if NEEDS_DXA:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(dot_dtype)
            dxa = tl.dot(dy, b, dxa, input_precision=INPUT_PRECISION, out_dtype=dxa.dtype)
        if NEEDS_DB:
            part = _zeros_acc(BLOCK_N, BLOCK_R, IS_FP64)
            part = tl.dot(tl.trans(dy), xa, part, input_precision=INPUT_PRECISION, out_dtype=part.dtype)
            p_ptrs = (db_partial_ptr + pid_m.to(tl.int64) * stride_pb
                      + offs_n[:, None] * stride_pn + offs_r[None, :] * stride_pr)
            tl.store(p_ptrs, part, mask=mask_n[:, None] & mask_r[None, :])
    if NEEDS_DXA:
        dxa_ptrs = dxa_ptr + offs_m.to(tl.int64)[:, None] * stride_dxam + offs_r[None, :] * stride_dxar
        tl.store(dxa_ptrs, dxa, mask=mask_m[:, None] & mask_r[None, :])


def _dx_configs():
    return gemm_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=8),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}),
    )


# Operand tiles per pipeline stage: dy (BLOCK_M, BLOCK_N) and W (BLOCK_N, BLOCK_K).
DX_TILES = (("BLOCK_M", "BLOCK_K"), "BLOCK_N")


@triton.autotune(configs=_dx_configs(), key=["T", "N", "K", "R", "HAS_DROPOUT", "IS_FP64"],
                 prune_configs_by={"early_config_prune": shared_memory_pruner("dy_ptr", *DX_TILES)})
@triton.jit
def _lora_bwd_dx_kernel(
    # pointers
    dy_ptr,   # (T, N) upstream gradient
    w_ptr,    # (N, K) frozen weight
    dxa_ptr,  # (T, R) dy B, fp32 / fp64
    a_ptr,    # (R, K) lora_A
    dx_ptr,   # (T, K) output, x's dtype
    # sizes
    T, N, K, R,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dxam, stride_dxar,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    # LoRA scaling and dropout (seed, 16-bit threshold, 1/(1-p)); floats as fp32 hi + lo
    scaling_hi, scaling_lo, seed, threshold, dropout_scale_hi, dropout_scale_lo,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, IS_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy W + scaling * D(dxa A): the mask is regenerated once per dx element."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    k_start = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_k = offs_k < K
    mask_r = offs_r < R
    dot_dtype = dy_ptr.dtype.element_ty

    # The masked expand first: D() acts on the LoRA part alone, so it has its
    # own small accumulator; the base GEMM then accumulates on top of it.
    dxa = tl.load(dxa_ptr + offs_m.to(tl.int64)[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
                  mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    acc = _zeros_acc(BLOCK_M, BLOCK_K, IS_FP64)
    scaling = _scalar(scaling_hi, scaling_lo, IS_FP64)
    acc = tl.dot((dxa * scaling).to(dot_dtype), a.to(dot_dtype), acc,
        input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    if HAS_DROPOUT:
        keep = _keep_tile(seed, threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
        acc = tl.where(keep, acc * _scalar(dropout_scale_hi, dropout_scale_lo, IS_FP64), 0.0)

    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_cols + offs_n.to(tl.int64)[:, None] * stride_wn, mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _lora_bwd_da_kernel(
    # pointers
    dxa_ptr,         # (T, R) dy B, fp32 / fp64
    x_ptr,           # (T, K) saved input
    da_partial_ptr,  # (SPLITS, R, K) output: dxa^T D(x) over each split's rows
    # sizes
    T, K, R, rows_per_split,
    # strides
    stride_dxam, stride_dxar,
    stride_xm, stride_xk,
    stride_ps, stride_pr, stride_pk,
    # dropout: seed, 16-bit threshold, 1/(1-p) as fp32 hi + lo
    seed, threshold, dropout_scale_hi, dropout_scale_lo,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, K_ALIGNED: tl.constexpr, IS_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (k block, split): partial dA over rows [split * rows_per_split, +rows_per_split)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty
    acc = _zeros_acc(BLOCK_R, BLOCK_K, IS_FP64)
    dropout_scale = _scalar(dropout_scale_hi, dropout_scale_lo, IS_FP64)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep_tile(seed, threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
            x = tl.where(keep, x * dropout_scale, 0.0).to(dot_dtype)
        dxa_t = tl.load(dxa_ptr + offs_m.to(tl.int64)[None, :] * stride_dxam + offs_r[:, None] * stride_dxar,
                        mask=mask_r[:, None] & mask_m[None, :], other=0.0).to(dot_dtype)
        acc = tl.dot(dxa_t, x, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    p_ptrs = (da_partial_ptr + pid_s.to(tl.int64) * stride_ps
              + offs_r[:, None] * stride_pr + offs_k[None, :] * stride_pk)
    tl.store(p_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])
