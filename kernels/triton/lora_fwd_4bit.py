"""Forward step 2 on a 4-bit base, fused: y = x W^T + b + scaling * xa B^T with W dequantized
tile by tile in registers from the bitsandbytes bytes (never written to memory).

For short inputs (decode, small batches) the GEMM is bound by reading W: 0.5 byte per weight
here against 2 (bf16) for a dequantized copy, which must also be written first. Each W element
is the value ``dequant_4bit`` writes (fp32 code value times fp32 absmax, rounded once to x's
dtype), so this equals dequantize-then-GEMM up to the order of the GEMM's additions.

Optional and unmeasured: no launcher path chooses it by default.
"""

import triton
import triton.language as tl

from .common import _grouped_tile, _lora_expand
from .dequant_4bit import _block_absmax, _code_value


@triton.jit
def _lora_fwd_4bit_kernel(
    # pointers
    x_ptr,              # (T, K) input, fp16 / bf16 / fp32
    packed_ptr,         # ((N*K + 1) // 2,) uint8: the 4-bit weight, first element in the high nibble
    code_ptr,           # (16,) fp32 code book
    absmax_ptr,         # (ceil(N*K / BLOCKSIZE),) fp32, or uint8 when NESTED
    nested_code_ptr,    # (256,) fp32 (read when NESTED)
    nested_absmax_ptr,  # (ceil(len(absmax) / NESTED_BLOCKSIZE),) fp32 (read when NESTED)
    offset_ptr,         # () fp32 (read when NESTED and OFFSET_FROM_PTR)
    bias_ptr,           # (N,) frozen bias (unused unless HAS_BIAS)
    xa_ptr,             # (T, R) shrink output, fp32
    b_ptr,              # (N, R) lora_B
    y_ptr,              # (T, N) output, x's dtype
    # sizes and scalars
    T, N, K, R, offset,
    # strides
    stride_xm, stride_xk,
    stride_xam, stride_xar,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, IS_FP4: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    OFFSET_FROM_PTR: tl.constexpr, ABSMAX_PER_COLUMN: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: a (BLOCK_M, BLOCK_N) tile of y, in grouped order.

    ABSMAX_PER_COLUMN (K % BLOCKSIZE == 0 and BLOCK_K divides BLOCKSIZE): a K step of one
    column n of W^T lies in one quantization block, so the absmax is loaded once per column
    and step; otherwise once per element.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < T
    mask_n = offs_n < N
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty
    if NESTED and OFFSET_FROM_PTR:
        offset = tl.load(offset_ptr)

    # NOTE: the low-rank expand goes into the accumulator before the K loop, its dot as in
    # _lora_fwd_kernel (LORA_FP32: fp32 adapters keep fp32 operands, a "tf32" dot, not x's dtype).
    acc = _lora_expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), xa_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m,
                       mask_n, mask_r, stride_xam, stride_xar, stride_bn, stride_br, scaling, dot_dtype, LORA_FP32,
                       LORA_PRECISION)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    row_start = offs_n.to(tl.int64) * K  # flat index of W[n, 0]
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # W^T tile (BLOCK_K, BLOCK_N): element (k, n) is flat element n*K + k of W.
        tile_mask = mask_k[:, None] & mask_n[None, :]
        flat = row_start[None, :] + offs_k[:, None]
        byte = tl.load(packed_ptr + (flat >> 1), mask=tile_mask, other=0).to(tl.int32)
        value = _code_value(code_ptr, tl.where((flat & 1) == 0, byte >> 4, byte & 15), IS_FP4)
        if ABSMAX_PER_COLUMN:
            absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset,
                                   (row_start + k_start) // BLOCKSIZE, mask_n, NESTED, NESTED_BLOCKSIZE)[None, :]
        else:
            absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset, flat // BLOCKSIZE,
                                   tile_mask, NESTED, NESTED_BLOCKSIZE)
        # NOTE: W is rounded to x's dtype as the dequantized copy would be. Masked elements hold
        # finite values (code value times a masked-load absmax), which meet x's zeros (k >= K) or
        # land in columns that are not stored (n >= N): no select needed.
        w_t = (value * absmax).to(dot_dtype)
        acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :].to(tl.float32)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
