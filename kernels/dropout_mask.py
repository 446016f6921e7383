"""The counter-based dropout mask, in registers (fused_lora/philox.py has the contract).

Element (i, k) of the flattened (T, K) input has index e = i * K + k (64-bit).
One Philox4x32-10 call with counter (g mod 2**32, g >> 32, 0, 0), g = e >> 3,
and key (seed mod 2**32, seed >> 32) gives 128 bits: 16 for each of the 8
elements e = 8g .. 8g + 7. An element is kept when its 16 bits >= threshold.
"""

import triton
import triton.language as tl


@triton.jit
def _philox_words(seed, groups):
    """Four uint32 Philox4x32-10 words for each int64 group index."""
    c0 = (groups & 0xFFFFFFFF).to(tl.uint32)
    c1 = (groups >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero, zero)


@triton.jit
def _keep_tile(seed, threshold, offs_m, k_start, K,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_K) keep mask for rows ``offs_m`` and columns k_start + arange(BLOCK_K).

    K_ALIGNED (K % 8 == 0, k_start % 8 == 0): a row's 8-element groups do not
    straddle rows, so one Philox call per group serves 8 elements and the 8
    16-bit lanes are interleaved back into element order.
    Otherwise every element runs the Philox call of its own group (8x the work).
    """
    if K_ALIGNED:
        # NOTE: (BLOCK_M, BLOCK_K // 8) Philox calls instead of BLOCK_M * BLOCK_K.
        groups = offs_m.to(tl.int64)[:, None] * (K // 8) + (k_start // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
        o0, o1, o2, o3 = _philox_words(seed, groups)
        # join(join(o0, o2), join(o1, o3))[..., b, a] == o[2 * b + a]: word order after reshape.
        words = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_M, BLOCK_K // 2))
        bits = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_M, BLOCK_K))
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        elements = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
        o0, o1, o2, o3 = _philox_words(seed, elements >> 3)
        lane = (elements & 7).to(tl.int32)
        word = tl.where(lane < 4, tl.where(lane < 2, o0, o1), tl.where(lane < 6, o2, o3))
        bits = tl.where((lane & 1) == 0, word & 0xFFFF, word >> 16)
    return bits >= threshold


@triton.jit
def _dropout_mask_kernel(
    # pointers
    out_ptr,  # (T, K) uint8, contiguous: 1 = kept
    # sizes
    T, K,
    # dropout
    seed, threshold,
    # meta-parameters
    K_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: a (BLOCK_M, BLOCK_K) tile of the keep mask. Pointer: out (T, K) uint8."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, threshold, offs_m, pid_k * BLOCK_K, K, BLOCK_M, BLOCK_K, K_ALIGNED)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < T) & (offs_k[None, :] < K))
