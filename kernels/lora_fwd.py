"""Forward step 2: y = x W^T + b + scaling * xa B^T in one accumulator (kernel plan 2)."""

import triton
import triton.language as tl

from .common import _grouped_tile, _scalar, _zeros_acc, gemm_configs, shared_memory_pruner


def _fwd_configs():
    return gemm_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}),
    )


# Operand tiles per pipeline stage: x (BLOCK_M, BLOCK_K) and W^T (BLOCK_K, BLOCK_N).
FWD_TILES = (("BLOCK_M", "BLOCK_N"), "BLOCK_K")


@triton.autotune(configs=_fwd_configs(), key=["T", "N", "K", "R", "IS_FP64"],
                 prune_configs_by={"early_config_prune": shared_memory_pruner("x_ptr", *FWD_TILES)})
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
    BLOCK_R: tl.constexpr,
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
    xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    b_t = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = _zeros_acc(BLOCK_M, BLOCK_N, IS_FP64)
    acc = tl.dot((xa * scaling).to(dot_dtype), b_t.to(dot_dtype), acc,
        input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

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
