"""The "torch" backend: a pure-PyTorch composite of the fused operations.

Same interface and the same saved state as the Triton and C++ backends (x,
xa and the seed; never the mask or D(x)), built from ATen GEMMs that
accumulate into the output with ``addmm_``. The mask comes from the same
Philox stream (``fused_lora.philox``) and is regenerated in backward. Temporaries
of shape (T, K) exist only inside one operation.

Operation interface shared by all backends (2-D tensors, checked by the caller):

* ``lora_shrink(x2d, lora_A, seed, dropout_p) -> (xa, keep_bits)``: xa = ``D(x) A^T``,
  (T, r) in the accumulation dtype (fp64 for fp64 inputs, else fp32); keep_bits
  the packed keep mask when the backend saves one (the triton backend's "bits"
  mode), else None.
* ``lora_forward(x2d, weight, bias, lora_B, xa, scaling) -> y``: (T, N) in x's dtype.
* ``lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p,
  keep_bits, needs_dx, needs_dA, needs_dB) -> (dx, dA, dB)``, None for what is not
  needed; ``x2d`` may be None when ``needs_dA`` is False.
* ``keep_mask(seed, rows, cols, dropout_p, device) -> bool (rows, cols)``.
* ``dequantize_4bit(weight, out) -> out``: the dense (N, K) weight of a 4-bit ``Weight4bit``
  (``fused_lora.quantized``) written into ``out`` (contiguous, fp16/bf16/fp32, on the packed
  weight's device): ``code[nibble] * absmax`` in fp32, rounded once to ``out``'s dtype.

``seed`` is an int or a 0-d int64 tensor (the triton backend reads it on the device;
the others read it on the host).
"""

from __future__ import annotations

import torch

from ..philox import keep_mask_torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    return keep_mask_torch(seed, rows, cols, dropout_p, device)


# NOTE: the dequantization runs over chunks of whole absmax blocks, so its temporaries (an index
# and two fp32 values per element) stay bounded whatever the weight's size.
DEQUANTIZE_CHUNK = 1 << 22


def block_absmax(weight, first: int, count: int) -> torch.Tensor:
    """fp32 absmax of blocks first .. first + count - 1 of a ``Weight4bit``, as bitsandbytes computes it:
    with double quantization ``nested_code[q] * nested_absmax[b // nested_blocksize]`` rounded to
    fp32, then ``+ offset`` (two roundings, never a fused multiply-add)."""
    absmax = weight.absmax[first:first + count]
    if not weight.nested:
        return absmax
    groups = torch.arange(first, first + count, device=absmax.device) // weight.nested_blocksize
    scaled = weight.nested_code[absmax.long()] * weight.nested_absmax[groups]
    offset = weight.offset
    if isinstance(offset, torch.Tensor):
        offset = offset.to(scaled.device)
    return scaled + offset


def dequantize_4bit(weight, out: torch.Tensor) -> torch.Tensor:
    """``out`` (N, K) = the dense weight of ``weight`` (a ``fused_lora.quantized.Weight4bit``), in out's dtype."""
    numel = weight.numel
    blocksize = weight.blocksize
    flat = out.view(-1)
    packed = weight.packed
    code = weight.code.to(out.device)
    chunk = max(blocksize, DEQUANTIZE_CHUNK // blocksize * blocksize)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)  # start is even (chunk and blocksize are)
        data = packed[start // 2:(stop + 1) // 2]
        nibbles = torch.stack((data >> 4, data & 15), dim=1).view(-1)[:stop - start]
        values = code[nibbles.long()]
        first, blocks = start // blocksize, -(-(stop - start) // blocksize)
        scale = block_absmax(weight, first, blocks)
        full = (stop - start) // blocksize * blocksize
        if full:
            flat[start:start + full].view(-1, blocksize).copy_(values[:full].view(-1, blocksize) * scale[:full // blocksize, None])
        if full < stop - start:
            flat[start + full:stop].copy_(values[full:] * scale[-1])
    return out


def _dropped(t: torch.Tensor, seed: int, dropout_p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D(t): a new tensor with the call's mask and the 1/(1-p) scale applied."""
    if mask is None:
        mask = keep_mask_torch(seed, t.shape[0], t.shape[1], dropout_p, t.device)
    return t * mask * (1.0 / (1.0 - dropout_p))


def _addmm_scaled_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out += scaling * (a @ b)`` in place.

    NOTE: BLAS skips the product when alpha == 0, which would drop a NaN/Inf of a or b;
    the reference multiplies (0 * Inf = NaN), so scaling == 0 multiplies here too.
    """
    if scaling == 0.0:
        return out.add_(torch.mm(a, b).mul_(scaling))
    return out.addmm_(a, b, alpha=scaling)


def lora_shrink(x2d, lora_A, seed, dropout_p):
    lora_input = x2d.to(lora_A.dtype)
    if dropout_p > 0.0:
        lora_input = _dropped(lora_input, int(seed), dropout_p)
    return torch.mm(lora_input, lora_A.t()).to(accumulation_dtype(x2d.dtype)), None


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    if bias is None:
        y = torch.mm(x2d, weight.t())
    else:
        y = torch.addmm(bias, x2d, weight.t())
    # NOTE: the expand accumulates into y in place: no (T, N) temporary.
    _addmm_scaled_(y, xa.to(y.dtype), lora_B.t().to(y.dtype), scaling)
    return y


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    lora_dtype = lora_A.dtype
    seed = int(seed) if dropout_p > 0.0 else 0
    dy_lora = dy.to(lora_dtype)
    dx = dA = dB = None
    if needs_dB:
        dB = torch.mm(dy_lora.t(), xa.to(lora_dtype)).mul_(scaling).to(lora_B.dtype)
    if needs_dx or needs_dA:
        dxa = torch.mm(dy_lora, lora_B)  # (T, r)
        mask = None
        if dropout_p > 0.0 and needs_dx and needs_dA:
            # NOTE: Philox in PyTorch ops is slow; dx and dA share one regeneration.
            mask = keep_mask_torch(seed, dy.shape[0], lora_A.shape[1], dropout_p, dy.device)
        if needs_dA:
            lora_input = x2d.to(lora_dtype)
            if dropout_p > 0.0:
                lora_input = _dropped(lora_input, seed, dropout_p, mask)
            dA = torch.mm(dxa.t(), lora_input).mul_(scaling).to(lora_A.dtype)
        if needs_dx:
            dx = torch.mm(dy, weight)
            if dropout_p > 0.0:
                # The mask sits between the expand and the sum, so the LoRA
                # part needs its own (T, K) temporary here.
                dx += _dropped(torch.mm(dxa, lora_A), seed, dropout_p, mask).mul_(scaling).to(dx.dtype)
            else:
                _addmm_scaled_(dx, dxa.to(dx.dtype), lora_A.to(dx.dtype), scaling)
    return dx, dA, dB
