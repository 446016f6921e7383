"""The counter-based dropout mask, in registers (fused_lora/philox.py has the contract).

Element (i, k) of the flattened (T, K) input has index e = i * K + k (64-bit).
One Philox4x32-10 call with counter (g mod 2**32, g >> 32, 0, 0), g = e >> 3,
and key (seed mod 2**32, seed >> 32) gives 128 bits: 16 for each of the 8
elements e = 8g .. 8g + 7. An element is kept when its 16 bits >= threshold.

The same bits can also travel packed, 1 bit per element: row i of a (T, ceil(K/8))
uint8 tensor holds element (i, k) in bit k % 8 of byte k // 8 (``_store_keep_bits``
writes them in the shrink, ``_load_keep_bits`` reads them in backward).
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
def _store_keep_bits(bits_ptr, stride_bits, keep, offs_m, mask_m, k_start, K,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pack a (BLOCK_M, BLOCK_K) keep tile into bytes: bit k % 8 of byte k // 8 of its row.

    k_start is a multiple of 8 (BLOCK_K is); columns >= K are stored as dropped.
    """
    offs_k = k_start + tl.arange(0, BLOCK_K)
    keep = keep & (offs_k < K)[None, :]
    lanes = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 8, 8))
    packed = tl.sum(lanes << tl.arange(0, 8)[None, None, :], axis=2)
    offs_byte = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_byte[None, :]
    tl.store(ptrs, packed.to(tl.uint8), mask=mask_m[:, None] & (offs_byte < (K + 7) // 8)[None, :])


@triton.jit
def _load_keep_bits(bits_ptr, stride_bits, offs_m, mask_m, k_start, K,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_K) keep tile for rows ``offs_m`` and columns k_start + arange(BLOCK_K)
    from the packed bytes (k_start a multiple of 8; columns >= K come out dropped).

    NOTE: one load per byte (8 elements), then the 8 bits spread by shifts: a 128x256 tile
    costs each of 256 threads 16 byte loads and their addresses, not 128 (the registers that
    made the dx GEMM's prologue spill).
    """
    offs_byte = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_byte[None, :]
    byte = tl.load(ptrs, mask=mask_m[:, None] & (offs_byte < (K + 7) // 8)[None, :], other=0).to(tl.int32)
    lanes = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(lanes, (BLOCK_M, BLOCK_K)) != 0


@triton.jit
def _dropout_mask_kernel(
    # pointers
    out_ptr,   # (T, K) uint8, contiguous: 1 = kept
    seed_ptr,  # () int64 seed
    # sizes
    T, K,
    # dropout
    threshold,
    # meta-parameters
    K_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: a (BLOCK_M, BLOCK_K) tile of the keep mask. Pointers: out (T, K) uint8, seed ()."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, threshold, offs_m, pid_k * BLOCK_K, K, BLOCK_M, BLOCK_K, K_ALIGNED)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < T) & (offs_k[None, :] < K))


@triton.jit
def _unpack_keep_bits_kernel(
    # pointers
    out_ptr,   # (T, K) uint8, contiguous: 1 = kept
    bits_ptr,  # (T, ceil(K / 8)) uint8 packed keep bits
    # sizes
    T, K, stride_bits,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Expand packed keep bits to one byte per element (tests and debugging)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < T
    mask_k = offs_k < K
    keep = _load_keep_bits(bits_ptr, stride_bits, offs_m, mask_m, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=mask_m[:, None] & mask_k[None, :])
