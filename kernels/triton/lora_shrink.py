"""Forward step 1: xa = D(x) A^T, the dropout-fused shrink (DESIGN.md, kernel plan 1)."""

import triton
import triton.language as tl

from .common import _lora_dot_exact_a, _scalar, _zeros_acc
from .dropout_mask import _keep_tile, _store_keep_bits


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,     # (T, K) input, any strides
    a_ptr,     # (R, K) lora_A
    xa_ptr,    # (SPLITS, T, R) output, fp32 (fp64 for fp64 x): xa, or one partial sum per K split
    seed_ptr,  # () int64 dropout seed (read if HAS_DROPOUT)
    bits_ptr,  # (T, ceil(K / 8)) uint8 output: packed keep mask (written if STORE_BITS)
    # sizes
    T, K, R, k_per_split,
    # strides
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_xas, stride_xam, stride_xar,
    stride_bits,
    # dropout: 16-bit threshold, 1/(1-p) as fp32 hi + lo
    threshold, dropout_scale_hi, dropout_scale_lo,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, STORE_BITS: tl.constexpr, K_ALIGNED: tl.constexpr,
    IS_FP64: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr, LORA_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (row block, K split): BLOCK_M rows of xa over columns [split * k_per_split,
    +k_per_split) of x (k_per_split a multiple of BLOCK_K; one split: all of K). Reads x
    once; the mask lives in registers (and, with STORE_BITS, leaves as 1 bit per element
    for backward). With several splits each writes its partial sum (``_sum_partials_kernel``
    adds them in order).

    NOTE: split K rather than shrink BLOCK_M to give every SM work: each program reloads
    its lora_A slice once per BLOCK_M rows, so 16-row programs read 2 bytes of fp32 lora_A
    (L2) per byte of bf16 x at r = 16; 64-row programs with 2 splits read 0.5.

    Pointers: x (T, K), a = lora_A (R, K), xa (SPLITS, T, R), seed (), bits (T, ceil(K/8)).
    BLOCK_R >= 16 pads the rank for tl.dot (masked loads, r itself is any value).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty
    acc = _zeros_acc(BLOCK_M, BLOCK_R, IS_FP64)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        dropout_scale = _scalar(dropout_scale_hi, dropout_scale_lo, IS_FP64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_begin = pid_s * k_per_split
    for k_start in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep_tile(seed, threshold, offs_m, k_start, K, BLOCK_M, BLOCK_K, K_ALIGNED)
            if STORE_BITS:
                _store_keep_bits(bits_ptr, stride_bits, keep, offs_m, mask_m, k_start, K, BLOCK_M, BLOCK_K)
            # NOTE: a dropped element is multiplied by 0.0, not selected away, so NaN/Inf
            # in x spread exactly as in PEFT and F.dropout.
            if LORA_SPLIT:
                x = x * keep.to(x.dtype)  # stays exact in tf32; 1/(1-p) joins after the sum
            else:
                x = x * tl.where(keep, dropout_scale, 0.0)  # fp32 (fp64) D(x) where the branch is
        # lora_A^T tile (BLOCK_K, BLOCK_R)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _lora_dot_exact_a(x, a, acc, dot_dtype, LORA_SPLIT, LORA_FP32, LORA_PRECISION)
    if HAS_DROPOUT and LORA_SPLIT:
        acc = acc * dropout_scale
    xa_ptrs = (xa_ptr + pid_s.to(tl.int64) * stride_xas + offs_m.to(tl.int64)[:, None] * stride_xam
               + offs_r[None, :] * stride_xar)
    tl.store(xa_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])
