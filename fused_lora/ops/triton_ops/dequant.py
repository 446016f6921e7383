"""The triton backend's ``dequantize_4bit``: a bitsandbytes 4-bit weight, read in place, into a dense buffer.

``weight`` is the 4-bit weight object of ``fused_lora/quantized.py`` (``Weight4bit``: the
fields ``packed, shape, blocksize, quant_type, code, absmax, nested, nested_code,
nested_absmax, nested_blocksize, offset, dtype``); ``out`` is a contiguous (N, K) fp16, bf16
or fp32 tensor on the packed tensor's device, typically a buffer reused across calls. The
result is bit for bit bitsandbytes 0.50.2's CUDA ``dequantize_4bit`` of the same bytes with
``quant_state.dtype == out.dtype`` (the fp32 product rounded once to ``out.dtype``); the
kernel (``kernels/triton/dequant_4bit.py``) has the formula.

Cost: memory-bound. It reads N*K/2 bytes of packed weight plus the absmax (N*K/64 bytes
nested, N*K/16 plain, at blocksize 64) and writes N*K * out.element_size() bytes: for a
4096 x 4096 bf16 weight, 8.0 MiB + 0.25 MiB read and 32 MiB written.
"""

from __future__ import annotations

import torch
import triton

from ...kernels.dequant_4bit import _dequant_4bit_kernel
from .launch import _aligned, _grid_device, _Launch
from .plans import _PlanCache

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# NOTE: 4096 elements per program (2 KiB read, 8 KiB written in bf16) over 4 warps: each
# thread turns 16 packed bytes into 32 elements, 16 bytes per store (4 stores in bf16, 8 in
# fp32); a 4096 x 4096 weight gives 4096 programs, enough to stream without a persistent loop.
# Compiled for sm_90 (Triton 3.6 and 3.9): 34-72 registers, no spills, no shared memory.
TILE_ELEMENTS = 4096
NUM_WARPS = 4

_DEQUANT_PLANS = _PlanCache(256)


def _require(name: str, value, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"weight.{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype or value.numel() != numel or not value.is_contiguous() or value.device != device:
        raise ValueError(f"weight.{name}: expected a contiguous {dtype} tensor of {numel} elements on {device}, "
                         f"got {value.dtype} of shape {tuple(value.shape)} on {value.device}"
                         + ("" if value.is_contiguous() else ", not contiguous"))


def _checked_weight(weight):
    """``(packed as a plain tensor, n, offset tensor or None, offset as a float)``; raises naming the field."""
    packed = weight.packed
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"weight.packed: expected a torch.Tensor, got {type(packed).__name__}")
    if isinstance(packed, torch.nn.Parameter):
        # NOTE: bitsandbytes' Params4bit pays ~1.2 us of __torch_function__ per attribute read;
        # its .data is the same storage as a plain tensor (one such read instead of eight).
        packed = packed.data
    device = packed.device
    shape = weight.shape
    if len(shape) != 2 or type(shape[0]) is not int or type(shape[1]) is not int or shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"weight.shape: expected (out_features, in_features), got {shape!r}")
    n = shape[0] * shape[1]
    needed = (n + 1) // 2
    stored = packed.numel() * packed.element_size()
    if not packed.is_contiguous() or not 0 <= stored - needed < packed.element_size():
        raise ValueError(f"weight.packed: expected {needed} contiguous bytes ((N*K+1)//2 for shape {tuple(shape)}), "
                         f"got {packed.dtype} of shape {tuple(packed.shape)} ({stored} bytes)"
                         + ("" if packed.is_contiguous() else ", not contiguous"))
    if packed.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes
        packed = packed.view(torch.uint8)
    if weight.blocksize not in BLOCKSIZES:
        raise ValueError(f"weight.blocksize: expected one of {BLOCKSIZES}, got {weight.blocksize!r}")
    if weight.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"weight.quant_type: expected 'nf4' or 'fp4', got {weight.quant_type!r}")
    _require("code", weight.code, torch.float32, 16, device)
    blocks = -(-n // weight.blocksize)
    if not weight.nested:
        _require("absmax", weight.absmax, torch.float32, blocks, device)
        return packed, n, None, 0.0
    _require("absmax", weight.absmax, torch.uint8, blocks, device)
    nested_blocksize = weight.nested_blocksize
    if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise ValueError(f"weight.nested_blocksize: expected a positive int, got {nested_blocksize!r}")
    _require("nested_code", weight.nested_code, torch.float32, 256, device)
    _require("nested_absmax", weight.nested_absmax, torch.float32, -(-blocks // nested_blocksize), device)
    offset = weight.offset
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.float32 or offset.numel() != 1:
            raise ValueError(f"weight.offset: expected a float or a one-element float32 tensor, got {offset.dtype} "
                             f"of shape {tuple(offset.shape)}")
        if offset.device == device:
            return packed, n, offset, 0.0
        if offset.device.type != "cpu":
            raise ValueError(f"weight.offset: expected a tensor on {device} or the CPU, got one on {offset.device}")
        return packed, n, None, float(offset)  # a CPU scalar: read on the host, no device sync
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"weight.offset: expected a float or a float32 tensor, got {type(offset).__name__}")
    return packed, n, None, float(offset)


def _checked(weight, out):
    """(1) check the weight and ``out``; what ``_checked_weight`` returns."""
    checked = _checked_weight(weight)
    packed = checked[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    shape = tuple(weight.shape)
    if (out.dtype not in OUT_DTYPES or out.shape != shape or not out.is_contiguous()
            or out.device != packed.device):
        raise ValueError(f"out: expected a contiguous float16, bfloat16 or float32 tensor of shape {shape} on "
                         f"{packed.device} (the packed weight's device), got {out.dtype} of shape "
                         f"{tuple(out.shape)} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous"))
    return checked


def _weight_arguments(weight, packed, offset_tensor):
    """The kernels' seven weight pointers' worth of tensors: packed, code, absmax, nested code,
    nested absmax, offset (what is never read, NESTED=False or a host offset, is any fp32 tensor)."""
    code = weight.code
    if not weight.nested:
        return packed, code, weight.absmax, code, code, code
    nested_absmax = weight.nested_absmax
    return (packed, code, weight.absmax, weight.nested_code, nested_absmax,
            offset_tensor if offset_tensor is not None else nested_absmax)


def _weight_layout(weight, offset_tensor) -> tuple:
    """(blocksize, quant_type, nested, nested_blocksize, offset_from_ptr): what the kernels are compiled
    for in the weight; the first arguments of ``dequant_launch_options`` and ``forward_4bit_launch_options``."""
    nested = bool(weight.nested)
    return (weight.blocksize, weight.quant_type, nested, weight.nested_blocksize if nested else 1,
            offset_tensor is not None)


def _weight_key(weight, packed, offset_tensor) -> tuple:
    """What a plan depends on in the weight: its layout and every tensor's 16-byte alignment."""
    nested = bool(weight.nested)
    return _weight_layout(weight, offset_tensor) + (
        _aligned(packed), _aligned(weight.code), _aligned(weight.absmax), nested and _aligned(weight.nested_code),
        nested and _aligned(weight.nested_absmax), offset_tensor is not None and _aligned(offset_tensor))


def weight_constexprs(blocksize: int, quant_type: str, nested: bool, nested_blocksize: int,
                      offset_from_ptr: bool) -> dict:
    """The weight layout's constexprs, shared by the dequantize kernel and the fused 4-bit forward."""
    return dict(BLOCKSIZE=blocksize, IS_FP4=quant_type == "fp4", NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
                OFFSET_FROM_PTR=offset_from_ptr)


def dequant_launch_options(blocksize: int, quant_type: str, nested: bool, nested_blocksize: int,
                           offset_from_ptr: bool, element_bytes: int) -> tuple[dict, dict]:
    """(constexprs, launch options) of the kernel for one weight layout (also what
    tools/compile_kernels.py compiles)."""
    constexprs = dict(weight_constexprs(blocksize, quant_type, nested, nested_blocksize, offset_from_ptr),
                      TILE=TILE_ELEMENTS, GROUP=8 // element_bytes)
    # NOTE: no FMA contraction: the nested absmax is code2[q] * absmax2 + offset with two
    # roundings, as bitsandbytes computes it (two separate kernels there).
    return constexprs, dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


def _plan(weight, out, packed, n, offset_tensor):
    """(2) the launch for this signature: grid, constexprs, options; on a GPU the compiled kernel."""
    key = (out.device, out.dtype, n, _aligned(out)) + _weight_key(weight, packed, offset_tensor)
    launch = _DEQUANT_PLANS.get(key)
    if launch is None:
        constexprs, options = dequant_launch_options(*_weight_layout(weight, offset_tensor), out.element_size())
        grid = (triton.cdiv(n, TILE_ELEMENTS),)
        launch = _DEQUANT_PLANS.put(key, _Launch(_dequant_4bit_kernel, grid, constexprs, options,
                                                 device_index=_grid_device(out.device)))
    return launch


def dequantize_4bit(weight, out: torch.Tensor) -> torch.Tensor:
    """Write the dense (N, K) weight of the 4-bit ``weight`` into ``out`` and return ``out``.

    ``weight.packed`` and the quantization state are only read. ``out`` must be contiguous,
    of shape ``weight.shape``, fp16, bf16 or fp32, on the packed tensor's device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``). Raises TypeError / ValueError naming the field.
    """
    packed, n, offset_tensor, offset = _checked(weight, out)
    if n == 0:
        return out
    launch = _plan(weight, out, packed, n, offset_tensor)
    launch(*_weight_arguments(weight, packed, offset_tensor), out, n, (n + 1) // 2, -(-n // weight.blocksize), offset)
    return out
