"""Dequantizing a bitsandbytes 4-bit weight (NF4 / FP4, with or without double quantization).

The (N, K) weight is flattened to n = N * K elements and quantized in blocks of
BLOCKSIZE consecutive elements, one absmax per block. Byte j of the packed tensor
holds element 2j in its high nibble and element 2j + 1 in its low nibble (for odd
n the last byte's low nibble is padding). Element e dequantizes, in fp32, as

    a    = absmax[e // BLOCKSIZE]                                        (plain)
    a    = (nested_code[absmax[b]] * nested_absmax[b // NESTED_BLOCKSIZE]) + offset
           with b = e // BLOCKSIZE, two roundings, no FMA               (double quantized)
    w[e] = round_to_out_dtype(value(nibble_e) * a)

which is what bitsandbytes 0.50.2 computes on CUDA: ``dequantize_4bit`` first runs
its 8-bit blockwise kernel on the uint8 absmax (``code[q] * absmax2``, rounded to
fp32), then adds ``offset`` in a separate torch op, then its 4-bit kernel
multiplies one fp32 code value by the fp32 absmax and rounds to the output dtype
(round to nearest even). The launcher compiles this kernel with
``enable_fp_fusion=False`` so the nested mul and add stay two roundings.

value(nibble): NF4 reads ``code[nibble]``. FP4 reads ``code[nibble & 7]`` and takes
the sign from bit 3, as bitsandbytes' CUDA kernel does (so 0b1000 gives -0.0; its
code book, from ``get_4bit_type("fp4")``, holds +0.0 there and equals the CUDA
table everywhere else, bit for bit).
"""

import triton
import triton.language as tl


@triton.jit
def _code_value(code_ptr, nibble, IS_FP4: tl.constexpr):
    """fp32 code value of each 4-bit index: code[nibble] (NF4); code[nibble & 7] signed by bit 3 (FP4)."""
    if IS_FP4:
        # NOTE: a product with +-1.0 (exact), not a negation: 0b1000 must give -0.0 as on CUDA.
        sign = tl.where((nibble & 8) != 0, -1.0, 1.0)
        value = tl.load(code_ptr + (nibble & 7)) * sign
    else:
        value = tl.load(code_ptr + nibble)
    return value


@triton.jit
def _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset, block, mask,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of each block index (loads masked by ``mask``; what masked lanes hold is unspecified)."""
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # NOTE: two fp32 roundings (the launchers turn FMA contraction off), as bitsandbytes:
        # its 8-bit dequantize writes code[q] * absmax2, then torch adds the offset.
        absmax = tl.load(nested_code_ptr + quantized) * scale + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    packed_ptr, code_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
    # sizes and scalars
    n_elements, n_bytes, n_blocks, offset,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr, IS_FP4: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
):
    """out[e] = value(nibble e) * absmax of e's block, for TILE elements per program.

    packed_ptr:        uint8 ((n + 1) // 2,): two elements a byte, the first in the high nibble.
    code_ptr:          fp32 (16,): the 4-bit code book (quant_state.code).
    absmax_ptr:        (ceil(n / BLOCKSIZE),): fp32; uint8 indices into nested_code when NESTED.
    nested_code_ptr:   fp32 (256,): the absmax code book (quant_state.state2.code); read when NESTED.
    nested_absmax_ptr: fp32 (ceil(len(absmax) / NESTED_BLOCKSIZE),) (quant_state.state2.absmax); read when NESTED.
    offset_ptr:        fp32 (): quant_state.offset; read when NESTED and OFFSET_FROM_PTR (else ``offset``).
    out_ptr:           fp16 / bf16 / fp32 (n,): the dense weight, contiguous.

    The tile is (TILE // (2 * GROUP), GROUP) bytes, GROUP = 8 // out element size: a row's
    2 * GROUP elements are one 16-byte store, so the layout Triton gives a row to load its bytes
    is the layout that stores its elements (no round trip through shared memory). A row lies in
    one quantization block (2 * GROUP divides BLOCKSIZE) and a program starts on a block boundary
    (BLOCKSIZE divides TILE).
    """
    ROWS: tl.constexpr = TILE // (2 * GROUP)
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    # NOTE: 64-bit scalar bases, 32-bit offsets within the tile: n may pass 2**31.
    first_block = pid.to(tl.int64) * (TILE // BLOCKSIZE)
    block = rows // (BLOCKSIZE // (2 * GROUP))
    block_mask = block < n_blocks - first_block

    if NESTED and OFFSET_FROM_PTR:
        offset = tl.load(offset_ptr)
    absmax = _block_absmax(absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset, first_block + block, block_mask,
                           NESTED, NESTED_BLOCKSIZE)

    first_byte = pid.to(tl.int64) * (TILE // 2)
    byte_offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    byte = tl.load(packed_ptr + first_byte + byte_offs, mask=byte_offs < n_bytes - first_byte, other=0).to(tl.int32)
    high = _code_value(code_ptr, byte >> 4, IS_FP4) * absmax[:, None]
    low = _code_value(code_ptr, byte & 15, IS_FP4) * absmax[:, None]
    out_ty = out_ptr.dtype.element_ty
    # (ROWS, GROUP, 2) -> (ROWS, 2 * GROUP): element 2j from the high nibble, 2j + 1 from the low one.
    weight = tl.reshape(tl.join(high.to(out_ty), low.to(out_ty)), (ROWS, 2 * GROUP))

    first_elem = pid.to(tl.int64) * TILE
    elem_offs = rows[:, None] * (2 * GROUP) + tl.arange(0, 2 * GROUP)[None, :]
    tl.store(out_ptr + first_elem + elem_offs, weight, mask=elem_offs < n_elements - first_elem)
