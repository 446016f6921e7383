"""Backward: the dy pass (dxa, dB partials), the dx GEMM with the masked expand, dA partials,
and the fixed-order sum of partials.

Kernel plan steps 3-5 of DESIGN.md. Reductions (dB and dA over T, dxa over N
when the dy pass splits N) write one partial per split; ``_sum_partials_kernel``
adds them in a fixed order, so results are bit-identical run to run (no atomics).

The dropout mask reaches backward either as the seed (``_keep_tile`` regenerates
it) or as packed keep bits written by the shrink (``MASK_FROM_BITS``); both give
the same bits.
"""

import triton
import triton.language as tl

from .common import _grouped_tile, _lora_dot, _lora_dot_exact_a, _lora_dot_exact_b, _scalar, _store_tile, _zeros_acc
from .dropout_mask import _keep_tile, _load_keep_bits


@triton.jit
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr,   # (T, N) upstream gradient
    b_ptr,    # (N, R) lora_B
    xa_ptr,   # (T, R) saved shrink output, fp32 / fp64
    dxa_ptr,  # (N_SPLITS, T, R) output: dy B over each column block (written if NEEDS_DXA)
    db_ptr,   # (M_SPLITS, N, R) output: dy^T xa over each row split (written if NEEDS_DB)
    # sizes
    T, N, R, rows_per_split,
    # strides
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    stride_dxas, stride_dxam, stride_dxar,
    stride_dbs, stride_dbn, stride_dbr,
    # meta-parameters
    NEEDS_DXA: tl.constexpr, NEEDS_DB: tl.constexpr, IS_FP64: tl.constexpr,
    LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, LORA_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (column block j, row split s): reads its part of dy once for both products.

    dxa partial j gets dy[rows, cols_j] B[cols_j] for every row of the split; the dB
    partial of split s gets dy[rows_s, cols_j]^T xa[rows_s] (accumulated in registers
    over the split's rows, stored once). A grid of column blocks x row splits keeps
    every SM busy whatever T is.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    dot_dtype = dy_ptr.dtype.element_ty
    if NEEDS_DXA:
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    db = _zeros_acc(BLOCK_N, BLOCK_R, IS_FP64)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    dxa_split = dxa_ptr + pid_n.to(tl.int64) * stride_dxas
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if NEEDS_DXA:
            part = _zeros_acc(BLOCK_M, BLOCK_R, IS_FP64)
            part = _lora_dot_exact_a(dy, b, part, dot_dtype, LORA_SPLIT, LORA_FP32, LORA_PRECISION)
            tl.store(dxa_split + offs_m.to(tl.int64)[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
                     part, mask=mask_m[:, None] & mask_r[None, :])
        if NEEDS_DB:
            xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            db = _lora_dot_exact_a(tl.trans(dy), xa, db, dot_dtype, LORA_SPLIT, LORA_FP32, LORA_PRECISION)
    if NEEDS_DB:
        tl.store(db_ptr + pid_s.to(tl.int64) * stride_dbs + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                 db, mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _sum_partials_kernel(
    # pointers
    partial_ptr,  # (S, M) partial sums, fp32 / fp64, rows contiguous
    out_ptr,      # (M,) output, contiguous, any float dtype
    # sizes
    S, M, stride_s,
    # scale as fp32 hi + lo
    scale_hi, scale_lo,
    # meta-parameters
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = scale * sum over s of partial[s], in the order s = 0, 1, ... (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if IS_FP64:
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = partial_ptr + offs
    for _ in range(0, S):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_s
    acc = acc * _scalar(scale_hi, scale_lo, IS_FP64)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_bwd_dx_kernel(
    # pointers
    dy_ptr,    # (T, N) upstream gradient
    w_ptr,     # (N, K) frozen weight
    dxa_ptr,   # (T, R) dy B, fp32 / fp64
    a_ptr,     # (R, K) lora_A
    dx_ptr,    # (T, K) output, x's dtype
    seed_ptr,  # () int64 dropout seed (read if HAS_DROPOUT and not MASK_FROM_BITS)
    bits_ptr,  # (T, ceil(K / 8)) uint8 packed keep mask (read if MASK_FROM_BITS)
    # sizes
    T, N, K, R,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dxam, stride_dxar,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    stride_bits,
    # LoRA scaling and dropout (16-bit threshold, 1/(1-p)); floats as fp32 hi + lo
    scaling_hi, scaling_lo, threshold, dropout_scale_hi, dropout_scale_lo,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, MASK_FROM_BITS: tl.constexpr, K_ALIGNED: tl.constexpr,
    IS_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_FP32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy W + scaling * D(dxa A): one program per (BLOCK_M, BLOCK_K) tile of dx; the
    reduction over N runs in BLOCK_N steps. Launched with N = 0 it writes only the masked
    expand (the first half of the cuBLAS hybrid)."""
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
    acc = _lora_dot(dxa * scaling, a, acc, dot_dtype, LORA_FP32, LORA_PRECISION)
    if HAS_DROPOUT:
        if MASK_FROM_BITS:
            keep = _load_keep_bits(bits_ptr, stride_bits, offs_m, mask_m, k_start, K, BLOCK_M, BLOCK_K)
        else:
            keep = _keep_tile(tl.load(seed_ptr), threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
        # NOTE: multiplied by 0.0, not selected away: NaN/Inf spread as in PEFT.
        acc = acc * tl.where(keep, _scalar(dropout_scale_hi, dropout_scale_lo, IS_FP64), 0.0)

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


@triton.jit(do_not_specialize=["num_programs"])
def _lora_bwd_dx_tma_kernel(
    # tensor descriptors
    dy_desc,   # (T, N) upstream gradient, block (BLOCK_M, BLOCK_N)
    w_desc,    # (N, K) frozen weight, block (BLOCK_N, BLOCK_K)
    dx_desc,   # (T, K) output, block (BLOCK_M, BLOCK_K), or BLOCK_K // 2 with EPILOGUE_SUBTILE
    # pointers
    dxa_ptr,   # (T, R) dy B, fp32
    a_ptr,     # (R, K) lora_A
    seed_ptr,  # () int64 dropout seed (read if HAS_DROPOUT and not MASK_FROM_BITS)
    bits_ptr,  # (T, ceil(K / 8)) uint8 packed keep mask (read if MASK_FROM_BITS)
    # sizes
    T, N, K, R,
    # strides
    stride_dxam, stride_dxar,
    stride_ar, stride_ak,
    stride_bits,
    # LoRA scaling and dropout (16-bit threshold, 1/(1-p))
    scaling, threshold, dropout_scale,
    # persistent grid: programs launched (min(tiles, SMs)), a runtime value (one compilation for every T)
    num_programs,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, MASK_FROM_BITS: tl.constexpr, K_ALIGNED: tl.constexpr,
    LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Persistent TMA version of ``_lora_bwd_dx_kernel`` (sm_90+, 16-bit, aligned rows).

    Output tiles (BLOCK_M, BLOCK_K) of dx in grouped order. As in the pointer kernel, the
    masked expand s * D(dxa A) starts the accumulator before the N loop (the plan of
    DESIGN.md): no second fp32 tile and no keep tile live beside the accumulator, and no
    rank tile in the pipelined loop. The N loop is TMA loads and wgmma only.
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_k
    dot_dtype = dy_desc.dtype
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if HAS_DROPOUT:
        if not MASK_FROM_BITS:
            seed = tl.load(seed_ptr)

    tile_id_c = start_pid - num_programs
    for tile_id in tl.range(start_pid, num_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_k = _grouped_tile(tile_id, num_pid_m, num_pid_k, GROUP_M)
        offs_am = pid_m * BLOCK_M
        k_start = pid_k * BLOCK_K
        offs_m = offs_am + tl.arange(0, BLOCK_M)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_m = offs_m < T
        mask_k = offs_k < K
        dxa = tl.load(dxa_ptr + offs_m.to(tl.int64)[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc = _lora_dot(dxa * scaling, a, acc, dot_dtype, LORA_FP32, LORA_PRECISION)
        if HAS_DROPOUT:
            if MASK_FROM_BITS:
                keep = _load_keep_bits(bits_ptr, stride_bits, offs_m, mask_m, k_start, K, BLOCK_M, BLOCK_K)
            else:
                keep = _keep_tile(seed, threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
            # NOTE: multiplied by 0.0, not selected away: NaN/Inf spread as in PEFT.
            acc = acc * tl.where(keep, dropout_scale, 0.0)
        for ni in range(n_tiles):
            offs_n = ni * BLOCK_N
            dy = dy_desc.load([offs_am, offs_n])
            w = w_desc.load([offs_n, k_start])
            acc = tl.dot(dy, w, acc)

        tile_id_c += num_programs
        pid_m, pid_k = _grouped_tile(tile_id_c, num_pid_m, num_pid_k, GROUP_M)
        _store_tile(dx_desc, acc, pid_m * BLOCK_M, pid_k * BLOCK_K, BLOCK_K, EPILOGUE_SUBTILE)


@triton.jit
def _lora_bwd_da_kernel(
    # pointers
    dxa_ptr,         # (T, R) dy B, fp32 / fp64
    x_ptr,           # (T, K) saved input
    da_partial_ptr,  # (SPLITS, R, K) output: dxa^T D(x) over each split's rows
    seed_ptr,        # () int64 dropout seed (read if HAS_DROPOUT and not MASK_FROM_BITS)
    bits_ptr,        # (T, ceil(K / 8)) uint8 packed keep mask (read if MASK_FROM_BITS)
    # sizes
    T, K, R, rows_per_split,
    # strides
    stride_dxam, stride_dxar,
    stride_xm, stride_xk,
    stride_ps, stride_pr, stride_pk,
    stride_bits,
    # dropout: 16-bit threshold, 1/(1-p) as fp32 hi + lo
    threshold, dropout_scale_hi, dropout_scale_lo,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, MASK_FROM_BITS: tl.constexpr, K_ALIGNED: tl.constexpr,
    IS_FP64: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, LORA_SPLIT: tl.constexpr,
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
    if HAS_DROPOUT:
        dropout_scale = _scalar(dropout_scale_hi, dropout_scale_lo, IS_FP64)
        if not MASK_FROM_BITS:
            seed = tl.load(seed_ptr)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, T)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            if MASK_FROM_BITS:
                keep = _load_keep_bits(bits_ptr, stride_bits, offs_m, mask_m, k_start, K, BLOCK_M, BLOCK_K)
            else:
                keep = _keep_tile(seed, threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
            if LORA_SPLIT:
                x = x * keep.to(x.dtype)  # stays exact in tf32; 1/(1-p) joins after the sum
            else:
                x = x * tl.where(keep, dropout_scale, 0.0)
        dxa_t = tl.load(dxa_ptr + offs_m.to(tl.int64)[None, :] * stride_dxam + offs_r[:, None] * stride_dxar,
                        mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        acc = _lora_dot_exact_b(dxa_t, x, acc, dot_dtype, LORA_SPLIT, LORA_FP32, LORA_PRECISION)
    if HAS_DROPOUT and LORA_SPLIT:
        acc = acc * dropout_scale
    p_ptrs = (da_partial_ptr + pid_s.to(tl.int64) * stride_ps
              + offs_r[:, None] * stride_pr + offs_k[None, :] * stride_pk)
    tl.store(p_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])
