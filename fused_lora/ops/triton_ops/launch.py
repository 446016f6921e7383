"""Launching Triton kernels with little host time, and the device facts the launchers need.

``_Launch`` holds one kernel with fixed constexprs, options and grid; after its first
call on a GPU it hands arguments straight to the compiled kernel's launcher, as
Triton's own ``JITFunction.run`` does after its cache lookup. The scalar helpers
(``_split_float``, ``_dropout_scalars``) turn Python floats into what the kernels read.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton

from ...env import env_flag
from ...kernels.common import interpreting
from ...philox import dropout_threshold

try:  # Triton >= 3.4 (host-side tensor descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer kernels only
    TensorDescriptor = None

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

_FP32_MAX = 3.4028234663852886e38


def autotuning() -> bool:
    """FUSED_LORA_AUTOTUNE: a switch (on by default; ``fused_lora.env``), or ``compile``.
    Off (0/false/no/off): no timing runs; each GEMM takes its heuristic default."""
    return env_flag("FUSED_LORA_AUTOTUNE", True, extra=("compile",)) is True


def compile_only() -> bool:
    """FUSED_LORA_AUTOTUNE=compile: run every candidate once (fills Triton's cache), time none."""
    return env_flag("FUSED_LORA_AUTOTUNE", True, extra=("compile",)) == "compile"


def force_tma() -> bool:
    """FUSED_LORA_FORCE_TMA (a switch, off by default): the TMA kernels under the interpreter
    (how the tests reach them on CPU)."""
    return env_flag("FUSED_LORA_FORCE_TMA", False) is True


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_float(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo representable in fp32 (Triton passes floats as fp32)."""
    if not -_FP32_MAX <= value <= _FP32_MAX:
        raise ValueError(f"scaling: {value!r} is outside the float32 range the triton backend passes "
                         f"scalars in (|scaling| <= {_FP32_MAX:.4g})")
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow PyTorch's own TF32 switch (off by default), like torch.mm;
    # fp64 is always exact; fp16/bf16 keep Triton's default (the flag only affects fp32).
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _lora_precision(dtype: torch.dtype, adapter_dtype: torch.dtype, gemm: bool = False) -> dict:
    """The constexprs that say how a kernel computes the LoRA branch's dots:
    LORA_FP32 (fp32 operands), LORA_PRECISION (tl.dot's input_precision) and, unless ``gemm``,
    LORA_SPLIT.

    fp32 adapters on a 16-bit input (PEFT's default) keep the branch in fp32, as PEFT and the
    torch backend do: rounding A, B, xa or dxa to 16 bits for a dot made dA and dB ~1000x less
    accurate. The skinny passes (shrink, dy pass, dA), whose results stay fp32, take LORA_SPLIT:
    the 16-bit operand is exact in tf32 and the fp32 one is split into two tf32 parts (two
    tensor-core dots, ``kernels/common.py``'s ``_lora_dot_exact_a``). The expands inside the two
    GEMMs (``gemm``), whose results are rounded to the 16-bit output, take one "tf32" dot of fp32
    operands: the precision of fp16 with the range of fp32.
    An fp32 input: fp32 operands at ``_input_precision`` (torch's allow_tf32); 16-bit adapters on
    a 16-bit input: the input's dtype; fp64: fp64.
    """
    split = False
    if dtype == torch.float64:
        fp32, precision = False, "ieee"
    elif dtype == torch.float32:
        fp32, precision = True, _input_precision(dtype)
    elif adapter_dtype in (torch.float32, torch.float64):
        fp32, precision, split = True, "tf32", not gemm
    else:
        fp32, precision = False, "tf32"
    constexprs = dict(LORA_FP32=fp32, LORA_PRECISION=precision)
    if not gemm:
        constexprs["LORA_SPLIT"] = split
    return constexprs


# ----------------------------------------------------------------------------- device facts

@functools.lru_cache(maxsize=None)
def _device_facts(device_index: int) -> tuple[int, int, int]:
    """(multiprocessors, compute capability major, shared memory bytes per program)."""
    props = torch.cuda.get_device_properties(device_index)
    shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return props.multi_processor_count, props.major, shared


def _programs_target(device: torch.device) -> int:
    """Programs that fill the device twice over (the interpreter: a few, run one after another)."""
    if device.type == "cuda":
        return 2 * _device_facts(_index(device))[0]
    return 4


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _columns_fit_int32(t: torch.Tensor) -> bool:
    """Whether every column offset of the 2-D ``t`` (column index times column stride) fits in int32.

    NOTE: the kernels compute row offsets in 64 bits (T * K passes 2**31) and column offsets in 32;
    only a column stride in the hundreds of millions (a transposed view of a huge tensor) passes
    2**31 - 1 there, and such a tensor is read from a contiguous copy (``plans``).
    """
    return (t.shape[1] - 1) * t.stride(1) < 2 ** 31


# ----------------------------------------------------------------------------- launching

def _raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # what Triton's own launcher asks torch for
    def _raw_stream(device_index: int) -> int:  # noqa: F811
        return torch._C._cuda_getCurrentRawStream(device_index)


class _Launch:
    """One kernel with fixed constexprs, launch options and grid.

    The first call goes through ``JITFunction.__getitem__`` (compiles, or finds the
    compiled kernel in Triton's cache); on a GPU the compiled kernel is kept and
    later calls hand the arguments straight to its launcher, skipping Triton's
    per-call binding, specialisation and cache lookup. That is safe because a plan
    is keyed on everything Triton specialises on: the dtypes, every integer
    argument's value and each user tensor's 16-byte alignment.
    """

    __slots__ = ("fn", "grid", "constexprs", "options", "compiled", "tail", "device_index")

    def __init__(self, fn, grid, constexprs: dict, options: dict | None = None, device_index: int | None = None):
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = constexprs
        self.options = options or {}
        self.compiled = None
        self.tail = None
        self.device_index = device_index

    def __call__(self, *args):
        compiled = self.compiled
        if compiled is not None and torch.cuda.current_device() == self.device_index:
            grid = self.grid
            stream = _raw_stream(self.device_index)
            call_args = args + self.tail
            metadata = compiled.launch_metadata(grid, stream, *call_args)
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                         _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *call_args)
            return
        if self.device_index is not None:
            with torch.cuda.device(self.device_index):
                kernel = self.fn[self.grid](*args, **self.constexprs, **self.options)
        else:
            kernel = self.fn[self.grid](*args, **self.constexprs, **self.options)
        self._keep(kernel, len(args))

    def _keep(self, kernel, runtime_args: int) -> None:
        if kernel is None or _knobs is None or self.device_index is None or interpreting():
            return
        if hasattr(kernel, "result"):  # Triton's async compile mode hands back a future
            kernel = kernel.result()
        names = self.fn.arg_names[runtime_args:]
        if getattr(kernel, "function", None) is None or any(n not in self.constexprs for n in names):
            return  # not the layout this fast path knows: stay on Triton's own path
        self.tail = tuple(self.constexprs[n] for n in names)
        self.compiled = kernel



def _grid_device(device: torch.device):
    return _index(device) if device.type == "cuda" else None



def _seed_tensor(seed, device):
    """The seed as the kernels read it: a 0-d int64 tensor on ``device``, 16-byte aligned
    (a plan's compiled kernels assume it, as for every tensor they allocate)."""
    if isinstance(seed, torch.Tensor):
        if seed.device != device:
            seed = seed.to(device)
        return seed if _aligned(seed) else seed.clone()
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def _dropout_scalars(dropout_p: float) -> tuple[int, float, float]:
    hi, lo = _split_float(1.0 / (1.0 - dropout_p)) if dropout_p > 0.0 else (1.0, 0.0)
    return dropout_threshold(dropout_p), hi, lo

