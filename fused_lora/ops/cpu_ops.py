"""The "cpu" backend: the C++ extension ``fused_lora._C``, and ATen GEMMs where they win.

Same interface as ``fused_lora.ops.torch_ops`` (see there). Two paths, chosen per call
from the shapes, the dropout and the ISA level (``fused_path``), never from the
machine's load or thread count:

* fused (most shapes): the C++ loops of csrc/ fuse the dropout into the shrink
  and into the dx / dA loops, regenerating the Philox mask tile by tile, and
  accumulate the expand into the base GEMM's output. Deterministic partial sums:
  xa, dA and dB are bit-identical for any thread count.
* aten: the rank-r products as ATen GEMMs (MKL), like the torch backend, with the
  dropout mask from the C++ Philox (``_C.dropout``) instead of torch ops. Used
  where the fused loops lose, measured with ``python -m bench.cpu_dispatch``:
  large ranks (their register-blocked loops are no GEMM), and few rows against
  large adapters (packing r * (K + N) adapter elements per call costs more than
  the rows' work). As deterministic as MKL: bit-identical run to run, and across
  thread counts only as far as MKL is.

The integer dropout threshold is computed here, by
``fused_lora.philox.dropout_threshold``, so its rounding is the same on every
backend. fp16 and bf16 inputs run the same paths (LoRA branch in fp32).

Environment: ``FUSED_LORA_ISA`` caps the ISA level of the C++ loops (avx512, avx2
or baseline; ``ISA`` is the level in use); ``FUSED_LORA_CPU_PATH=fused|aten``
forces one path for every call (default ``auto``). Both are read once; an invalid
value raises here.
"""

from __future__ import annotations

import torch

from .. import _C  # type: ignore[attr-defined]
from ..env import env_choice
from ..philox import dropout_threshold

_ENV_ERROR = _C.isa_env_error()
if _ENV_ERROR:
    raise ValueError(_ENV_ERROR)

ISA = _C.isa()
"""The ISA level of the C++ loops in this process: "avx512", "avx2" or "baseline"."""

PATHS = ("auto", "fused", "aten")
PATH = env_choice("FUSED_LORA_CPU_PATH", PATHS, "auto")

# NOTE: the rule of fused_path, from python -m bench.cpu_dispatch (fwd+bwd of both paths and of
# the torch backend, interleaved, 1 thread, T in {1, 16, 128, 4096}, K = N in {64, 256, 2048},
# r in {4, 16, 32, 64, 128, 256}, p in {0, 0.1}) on an Intel Xeon, on its avx512 path and on the
# forced avx2 path (MKL and ATen at AVX2 too); bench/results/cpu-dispatch-*.csv, docs/benchmarks.md:
# * tiny jobs (r (K + N) < 2**15 adapter elements and T r (K + N) <= 2**21): the fused path's
#   fewer ops win at any rank (up to 1.4x);
# * fewer rows than the rank on larger adapters: packing r (K + N) elements per call costs more
#   than ATen's GEMVs (up to 2.4x at T = 1);
# * otherwise the fused loops win up to a rank that depends on the ISA level and on dropout (the
#   fused mask saves ATen's D(x) and masked-dx passes); above it ATen's GEMMs win (the fused
#   loops are register-blocked, not cache-blocked; up to 1.6x at r = 256):
#   avx512: r <= 64 with dropout, r <= 32 without; avx2 (and baseline): r <= 32 with dropout,
#   r <= 16 without.
SMALL_ADAPTER_ELEMENTS = 1 << 15
SMALL_WORK = 1 << 21
MAX_FUSED_RANK = {  # (ISA level, dropout) -> the largest rank the fused loops run
    ("avx512", True): 64, ("avx512", False): 32,
    ("avx2", True): 32, ("avx2", False): 16,
    ("baseline", True): 32, ("baseline", False): 16,
}


def fused_path(rows: int, in_features: int, out_features: int, rank: int, dropout_p: float = 0.0) -> bool:
    """True: the fused C++ loops run this call; False: the ATen path. A function of the shapes,
    dropout_p and the ISA level: never of the machine's load or thread count."""
    if PATH != "auto":
        return PATH == "fused"
    adapter_elements = rank * (in_features + out_features)
    if adapter_elements < SMALL_ADAPTER_ELEMENTS and rows * adapter_elements <= SMALL_WORK:
        return True
    if rows < rank:
        return False
    return rank <= MAX_FUSED_RANK[(ISA, dropout_p > 0.0)]


# NOTE: the threshold of each p, computed once (dropout_threshold costs about a
# microsecond per call, a tenth of a whole tiny op).
_THRESHOLDS: dict[float, int] = {}


def _threshold(dropout_p: float) -> int:
    threshold = _THRESHOLDS.get(dropout_p)
    if threshold is None:
        threshold = _THRESHOLDS[dropout_p] = dropout_threshold(dropout_p)
    return threshold


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: a no-op .to() still costs a dispatch (about a microsecond).
    return t if t.dtype == dtype else t.to(dtype)


def keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    mask = _C.keep_mask(seed, rows, cols, _threshold(dropout_p))
    return mask.to(device)


def _quant_args(weight) -> tuple:
    """A ``Weight4bit`` as the C++ 4-bit functions take it: (packed, absmax, code, nested_absmax, nested_code,
    offset, blocksize, nested_blocksize), the nested parts None (offset 0.0) without double quantization."""
    if not weight.nested:
        return weight.packed, weight.absmax, weight.code, None, None, 0.0, weight.blocksize, 0
    offset = weight.offset
    offset = offset.item() if isinstance(offset, torch.Tensor) else float(offset)
    return (weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code, offset,
            weight.blocksize, weight.nested_blocksize)


def dequantize_4bit(weight, out: torch.Tensor) -> torch.Tensor:
    """``out`` (N, K) = the dense weight of a 4-bit ``Weight4bit`` (csrc/dequantize_4bit.cpp; bit-exact
    against the torch backend's and bitsandbytes' ``dequantize_4bit``)."""
    return _C.dequantize_4bit(*_quant_args(weight), out)


# NOTE: a 4-bit base with few rows runs its base GEMMs dequantizing W tile by tile in cache (_C.gemm_4bit)
# instead of into a whole dense buffer first: at small T the GEMM reads W once, so the buffer (a write and a
# read of N K fp32) costs as much again. Measured (2048x2048 NF4, fp32, r=16, p=0.1, fwd+bwd, 1 thread so that
# no other process's load enters, Intel Xeon, avx512), as a ratio to a frozen dense nn.Linear, tiled / buffer:
# T=1 1.55 / 2.25, T=16 1.09 / 1.48, T=64 1.01 / 1.09, T=96 1.19 / 1.20, T=128 1.21 / 1.17, T=256 1.84 / 1.18
# (the tiles are register-blocked, not a cache-blocked GEMM: MKL's wins from about 100 rows).
MAX_ROWS_4BIT_TILED = 64


def _tiled_4bit(x2d, weight) -> bool:
    """Whether the base GEMMs of this call run dequantizing tile by tile (_C.gemm_4bit)."""
    blocksize = weight.blocksize
    return (x2d.dtype == torch.float32 and x2d.shape[0] <= MAX_ROWS_4BIT_TILED and blocksize % 16 == 0
            and weight.shape[1] % blocksize == 0 and weight.packed.device.type == "cpu")


def _gemm_4bit(a, weight, out, transposed):
    return _C.gemm_4bit(a, *_quant_args(weight), weight.shape[0], weight.shape[1], transposed, out)


def lora_forward_4bit_tiled(x2d, weight, bias, lora_B, xa, scaling):
    """``lora_forward`` on a 4-bit ``Weight4bit`` with few fp32 rows, tiled (``_C.gemm_4bit``); None where the
    caller dequantizes into a buffer and runs ``lora_forward`` instead."""
    if not _tiled_4bit(x2d, weight):
        return None
    lora_B_t = _as(lora_B, xa.dtype).t()
    if bias is None:
        y = torch.mm(xa, lora_B_t).mul_(scaling)
    else:
        y = torch.addmm(bias, xa, lora_B_t, alpha=scaling)
    return _gemm_4bit(x2d if x2d.stride(1) == 1 else x2d.contiguous(), weight, y, True)


def lora_backward_4bit_tiled(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                       needs_dx, needs_dA, needs_dB):
    """``lora_backward`` on a 4-bit ``Weight4bit`` with few fp32 rows, dx tiled (``_C.gemm_4bit``); None where
    the caller dequantizes into a buffer and runs ``lora_backward`` instead."""
    if not needs_dx or not _tiled_4bit(dy, weight):
        return None
    _, dA, dB = lora_backward(dy, x2d, weight.dense_stand_in(dy.dtype), lora_A, lora_B, xa, scaling, seed,
                              dropout_p, keep_bits, False, needs_dA, needs_dB)
    # dx = s D(dxa A) + dy W, as the aten path: the LoRA term first, the base GEMM accumulated onto it.
    dxa = torch.mm(dy, _as(lora_B, dy.dtype))
    lora = torch.mm(dxa, _as(lora_A, dy.dtype))
    if dropout_p > 0.0:
        lora = _C.dropout(lora, seed, _threshold(dropout_p), dropout_p, scaling / (1.0 - dropout_p))
    else:
        lora.mul_(scaling)
    dx = _gemm_4bit(dy if dy.stride(1) == 1 else dy.contiguous(), weight, lora, False)
    return dx, dA, dB


def random_uint16(seed: int, start: int, count: int) -> torch.Tensor:
    """The 16-bit values of flattened elements ``start .. start + count - 1`` (as ``philox.random_uint16``)."""
    return _C.random_uint16(seed, start, count)


# seed: an int or a 0-d int64 CPU tensor; the C++ side reads it only when dropout_p > 0.

def lora_linear(x2d, weight, bias, lora_A, lora_B, scaling, seed, dropout_p):
    """y (T, N) of the whole layer as one C++ autograd node, or None where a call does not run
    the fused path in all three operations (the Python Function then runs the two paths' mix).

    For eager calls (``fused_lora_linear``): the node saves what the Function saves (x only
    when lora_A needs a gradient, xa, the seed as an int) and its backward is lora_backward,
    with no Python on the way (see csrc/lora_autograd.cpp).
    """
    rows, in_features = x2d.shape
    out_features, rank = lora_B.shape
    if not (fused_path(rows, in_features, in_features, rank, dropout_p)
            and fused_path(rows, in_features, out_features, rank)
            and fused_path(rows, in_features, out_features, rank, dropout_p)):
        return None
    return _C.lora_linear(x2d, weight, bias, lora_A, lora_B, scaling, seed, _threshold(dropout_p), dropout_p)


def lora_shrink(x2d, lora_A, seed, dropout_p):
    rows, in_features = x2d.shape
    rank = lora_A.shape[0]
    if fused_path(rows, in_features, in_features, rank, dropout_p):
        return _C.lora_shrink(x2d, lora_A, seed, _threshold(dropout_p), dropout_p), None
    acc = _acc_dtype(x2d.dtype)
    if dropout_p > 0.0:
        lora_input = _C.dropout(x2d, seed, _threshold(dropout_p), dropout_p, 1.0 / (1.0 - dropout_p))
    else:
        lora_input = _as(x2d, acc)
    return torch.mm(lora_input, _as(lora_A, acc).t()), None


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    rows, in_features = x2d.shape
    out_features, rank = lora_B.shape
    if fused_path(rows, in_features, out_features, rank):  # no mask here: the rule without dropout
        return _C.lora_forward(x2d, weight, bias, lora_B, xa, scaling)
    # As the fused path: b + s xa B^T in fp32, rounded once, then the base GEMM onto it.
    lora_B_t = _as(lora_B, xa.dtype).t()
    if bias is None:
        lora = torch.mm(xa, lora_B_t).mul_(scaling)
    else:
        lora = torch.addmm(_as(bias, xa.dtype), xa, lora_B_t, alpha=scaling)
    return _as(lora, x2d.dtype).addmm_(x2d, weight.t())


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    rows, out_features = dy.shape
    rank, in_features = lora_A.shape
    threshold = _threshold(dropout_p)
    if fused_path(rows, in_features, out_features, rank, dropout_p):
        return _C.lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, threshold,
                                dropout_p, needs_dx, needs_dA, needs_dB)
    acc = xa.dtype
    dy_acc = _as(dy, acc)
    dx = dA = dB = None
    if needs_dB:
        dB = _as(torch.mm(dy_acc.t(), xa).mul_(scaling), lora_B.dtype)
    if needs_dx or needs_dA:
        dxa = torch.mm(dy_acc, _as(lora_B, acc))
        if needs_dA:
            if dropout_p > 0.0:
                lora_input = _C.dropout(x2d, seed, threshold, dropout_p, 1.0 / (1.0 - dropout_p))
            else:
                lora_input = _as(x2d, acc)
            dA = _as(torch.mm(dxa.t(), lora_input).mul_(scaling), lora_A.dtype)
        if needs_dx:
            lora = torch.mm(dxa, _as(lora_A, acc))
            if dropout_p > 0.0:
                lora = _C.dropout(lora, seed, threshold, dropout_p, scaling / (1.0 - dropout_p))
            else:
                lora.mul_(scaling)
            # As the fused path: s D(dxa A) first, the base GEMM accumulated onto it.
            dx = _as(lora, dy.dtype).addmm_(dy, weight)
    return dx, dA, dB
