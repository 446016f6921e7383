"""Forward step 2: y = x W^T + b + scaling * xa B^T in one accumulator (kernel plan 2).

Two kernels compute it:

* ``_lora_fwd_kernel``: pointer loads, one program per output tile; any strides,
  any GPU, and the interpreter. Launched with K = 0 it writes only the low-rank
  term and the bias: the first half of the cuBLAS hybrid (the launcher then adds
  x W^T with ``addmm_``).
* ``_lora_fwd_tma_kernel``: Hopper (sm_90+) and 16-bit inputs whose rows are
  16-byte aligned; tensor descriptors (TMA) and a persistent tile loop.
"""

import triton
import triton.language as tl

from .common import _grouped_tile, _lora_expand, _scalar, _store_tile, _zeros_acc


@triton.jit
def _lora_fwd_kernel(
    # pointers
    x_ptr,     # (T, K) input
    w_ptr,     # (N, K) frozen weight
    bias_ptr,  # (N,) frozen bias (unused unless HAS_BIAS)
    xa_ptr,    # (T, R) shrink output, fp32 / fp64
    b_ptr,     # (N, R) lora_B
    y_ptr,     # (T, N) output, x's dtype
    # sizes
    T, N, K, R,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_xam, stride_xar,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    # LoRA scaling as fp32 hi + lo
    scaling_hi, scaling_lo,
    # meta-parameters
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: a (BLOCK_M, BLOCK_N) tile of y, in grouped order for L2 reuse.

    Pointers: x (T, K), w (N, K), bias (N,), xa (T, R) fp32/fp64, b = lora_B (N, R), y (T, N).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_n = offs_n < N
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty

    # NOTE: the low-rank expand goes into the accumulator before the K loop, so
    # y is written once and no (T, N) temporary exists.
    scaling = _scalar(scaling_hi, scaling_lo, IS_FP64)
    acc = _lora_expand(_zeros_acc(BLOCK_M, BLOCK_N, IS_FP64), xa_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n,
                       mask_r, stride_xam, stride_xar, stride_bn, stride_br, scaling, dot_dtype, LORA_FP32,
                       LORA_PRECISION)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_t = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["num_programs"])
def _lora_fwd_tma_kernel(
    # tensor descriptors
    x_desc,    # (T, K) input, block (BLOCK_M, BLOCK_K)
    w_desc,    # (N, K) frozen weight, block (BLOCK_N, BLOCK_K)
    y_desc,    # (T, N) output, block (BLOCK_M, BLOCK_N), or BLOCK_N // 2 with EPILOGUE_SUBTILE
    # pointers
    bias_ptr,  # (N,) frozen bias (unused unless HAS_BIAS)
    xa_ptr,    # (T, R) shrink output, fp32
    b_ptr,     # (N, R) lora_B
    # sizes
    T, N, K, R,
    # strides
    stride_xam, stride_xar,
    stride_bn, stride_br,
    # LoRA scaling
    scaling,
    # persistent grid: programs launched (min(tiles, SMs)); a runtime value, so a new tile
    # count (a new T) reuses the compiled kernel
    num_programs,
    # meta-parameters
    HAS_BIAS: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Persistent: program p computes tiles p, p + num_programs, ... of y (grouped order).

    The low-rank expand (a rank-BLOCK_R dot from xa and lora_B, pointer loads) starts the
    accumulator before the K loop, as in the pointer kernel: no rank tile is live in the
    pipelined loop or beside the accumulator in the epilogue. The K loop is TMA loads and
    wgmma only; the bias joins in the epilogue, before the single store of the tile.
    FLATTEN: flatten the tile and K loops for the pipeliner (off for warp specialisation
    on sm_90, as Triton's persistent-matmul tutorial does).
    """
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    dot_dtype = x_desc.dtype
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    # NOTE: the epilogue recomputes its tile from its own counter (tile_id_c), as in
    # Triton's persistent-matmul tutorial, so the flattened loop pipelines cleanly.
    tile_id_c = start_pid - num_programs
    for tile_id in tl.range(start_pid, num_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_am = pid_m * BLOCK_M
        offs_bn = pid_n * BLOCK_N
        offs_m = offs_am + tl.arange(0, BLOCK_M)
        offs_n = offs_bn + tl.arange(0, BLOCK_N)
        acc = _lora_expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), xa_ptr, b_ptr, offs_m, offs_n, offs_r,
                           offs_m < T, offs_n < N, mask_r, stride_xam, stride_xar, stride_bn, stride_br, scaling,
                           dot_dtype, LORA_FP32, LORA_PRECISION)
        for ki in range(k_tiles):
            offs_k = ki * BLOCK_K
            x = x_desc.load([offs_am, offs_k])
            w = w_desc.load([offs_bn, offs_k])
            acc = tl.dot(x, w.T, acc)

        tile_id_c += num_programs
        pid_m, pid_n = _grouped_tile(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        if HAS_BIAS:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc += bias[None, :].to(tl.float32)
        _store_tile(y_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N, EPILOGUE_SUBTILE)
