"""Launchers of the "triton" backend: check, allocate, pick the plan, launch.

Same operation interface as ``fused_lora.torch_ops``. Runs on CUDA tensors, and
on CPU tensors under ``TRITON_INTERPRET=1``. The kernels live in the top-level
``kernels/`` folder, installed as ``fused_lora.kernels``.

The host path is the hot path for small inputs, so everything that depends only
on shapes, strides, dtypes and flags is computed once per call signature and
cached in a *plan*: the grids, the constexprs, the chosen config and, on a GPU,
the compiled kernel itself. A later call with the same signature is one
dictionary lookup, the output allocations and one launch per kernel
(``_Launch``, which calls Triton's compiled launcher directly, as Triton's own
``JITFunction.run`` does after its cache lookup).

The two GEMMs (forward y, backward dx) have several strategies: the persistent
TMA kernels (sm_90+, 16-bit, aligned rows), the pointer kernels (any GPU, any
strides, the interpreter) and the cuBLAS hybrid (a Triton kernel writes the
low-rank term, then ``addmm_`` adds the base GEMM into it). On a GPU the
strategy and tile shape are timed once per shape class (``FUSED_LORA_AUTOTUNE=0``
skips the timing and takes the heuristic default).

The dropout mask reaches backward as packed keep bits written by the shrink
(``backends.TRITON_MASK_MODE = "bits"``: T * ceil(K/8) extra bytes saved) or is
regenerated from the seed (``"seed"``); ``FUSED_LORA_DROPOUT_MASK`` chooses.
"""

from __future__ import annotations

import functools
import os
import struct
import threading

import torch
import triton

from .kernels.common import (INTERPRETER_GEMM_CONFIG, POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS, GemmConfig,
                             fitting_gemm_configs, interpreting, rank_block)
from .kernels.dropout_mask import _dropout_mask_kernel, _unpack_keep_bits_kernel
from .kernels.lora_bwd import (_lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_dx_tma_kernel,
                               _lora_bwd_dy_kernel, _sum_partials_kernel)
from .kernels.lora_fwd import _lora_fwd_kernel, _lora_fwd_tma_kernel
from .kernels.lora_shrink import _lora_shrink_kernel
from .backends import saves_keep_bits
from .philox import dropout_threshold

try:  # Triton >= 3.4 (host-side tensor descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer kernels only
    TensorDescriptor = None

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

PLAN_CACHE_SIZE = 1024
_FP32_MAX = 3.4028234663852886e38


def autotuning() -> bool:
    """FUSED_LORA_AUTOTUNE=0: no timing runs; each GEMM takes its heuristic default."""
    return os.environ.get("FUSED_LORA_AUTOTUNE", "1") not in ("0", "compile")


def compile_only() -> bool:
    """FUSED_LORA_AUTOTUNE=compile: run every candidate once (fills Triton's cache), time none."""
    return os.environ.get("FUSED_LORA_AUTOTUNE", "1") == "compile"


def force_tma() -> bool:
    """FUSED_LORA_FORCE_TMA=1: the TMA kernels under the interpreter (how the tests reach them on CPU)."""
    return os.environ.get("FUSED_LORA_FORCE_TMA", "0") == "1"


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


class _PlanCache:
    """A bounded dict: the oldest plan goes when PLAN_CACHE_SIZE is reached."""

    def __init__(self, size: int):
        self.size = size
        self.plans: dict = {}
        self.lock = threading.Lock()

    def get(self, key):
        return self.plans.get(key)

    def put(self, key, plan):
        with self.lock:
            while len(self.plans) >= self.size:
                self.plans.pop(next(iter(self.plans)), None)
            self.plans[key] = plan
        return plan

    def clear(self):
        with self.lock:
            self.plans.clear()

    def __len__(self):
        return len(self.plans)


_SHRINK_PLANS = _PlanCache(PLAN_CACHE_SIZE)
_FORWARD_PLANS = _PlanCache(PLAN_CACHE_SIZE)
_BACKWARD_PLANS = _PlanCache(PLAN_CACHE_SIZE)
_TUNED: dict = {}  # (op, shape class) -> label of the chosen GEMM strategy
_TUNE_LOCK = threading.RLock()
CONFIG_OVERRIDES: dict = {}  # {"shrink": (BLOCK_M, BLOCK_K, warps, stages), "dy": ..., "da": ...}: benchmarks


def clear_plans() -> None:
    """Forget every plan and tuning decision (the next calls rebuild them)."""
    for cache in (_SHRINK_PLANS, _FORWARD_PLANS, _BACKWARD_PLANS):
        cache.clear()
    _TUNED.clear()


def plan_count() -> int:
    return len(_SHRINK_PLANS) + len(_FORWARD_PLANS) + len(_BACKWARD_PLANS)


def tuned_choices() -> dict:
    """{(op, shape class): strategy label} decided so far (benchmarks print it)."""
    return dict(_TUNED)


def _grid_device(device: torch.device):
    return _index(device) if device.type == "cuda" else None


# ----------------------------------------------------------------------------- skinny kernels' configs

def _skinny_config(name):
    """Decorator: CONFIG_OVERRIDES[name] when a benchmark set it, small blocks in the interpreter
    (several programs and loop steps even on test shapes), else the heuristic."""
    def wrap(heuristic):
        @functools.wraps(heuristic)
        def config(T, features, R, element_size, device):
            if name in CONFIG_OVERRIDES:
                return CONFIG_OVERRIDES[name]
            if interpreting():
                return 16, 32, 4, 1
            return heuristic(T, features, R, element_size, device)
        return config
    return wrap


@_skinny_config("shrink")
def _shrink_config(T, K, R, element_size, device):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the shrink."""
    block_r = rank_block(R)
    block_k = {2: 128, 4: 64}.get(element_size, 32)
    if block_r > 64:
        block_k = min(block_k, 64)
    # NOTE: rows per program shrink until the grid fills the device twice: a 64 MiB x
    # read by 128 programs left most SMs idle (measured on an H200: 36 us against 16).
    block_m = 64 if block_r <= 64 and element_size <= 4 else 32
    while block_m > 16 and triton.cdiv(T, block_m) < _programs_target(device):
        block_m //= 2
    return block_m, block_k, 4, 3


@_skinny_config("dy")
def _dy_config(T, N, R, element_size, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dy pass."""
    block_r = rank_block(R)
    base = {2: 256, 4: 128}.get(element_size, 64)
    # The (BLOCK_N, BLOCK_R) dB accumulator stays in registers: at most 4096 fp32 values per 4 warps.
    block_n = min(base, max(16, 16384 // block_r // max(1, element_size // 2)))
    block_m = 64 if block_r <= 32 and element_size <= 2 else 32
    return block_m, block_n, 8 if block_n * block_r >= 4096 else 4, 2


@_skinny_config("da")
def _da_config(T, K, R, element_size, device):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the dA partials."""
    block_r = rank_block(R)
    block_k = 128 if block_r <= 64 and element_size <= 2 else (64 if element_size <= 4 else 32)
    return 64 if element_size <= 4 else 32, block_k, 4, 3


def _splits(units: int, other_programs: int, device) -> int:
    """How many pieces to cut ``units`` row blocks into so the grid fills the device."""
    return max(1, min(units, triton.cdiv(_programs_target(device), max(1, other_programs))))


# ----------------------------------------------------------------------------- dropout

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


def keep_mask(seed, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    device = torch.device(device)
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if rows and cols:
        block_m, block_k = 32, 64
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
        launch = _Launch(_dropout_mask_kernel, grid, dict(K_ALIGNED=cols % 8 == 0, BLOCK_M=block_m, BLOCK_K=block_k),
                         device_index=_grid_device(device))
        launch(out, _seed_tensor(seed, device), rows, cols, dropout_threshold(dropout_p))
    return out.view(torch.bool)


def unpack_keep_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Bool (rows, cols) keep mask from packed keep bits (what the shrink saves in ``"bits"`` mode)."""
    rows = bits.shape[0]
    out = torch.empty((rows, cols), dtype=torch.uint8, device=bits.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 64))
        _Launch(_unpack_keep_bits_kernel, grid, dict(BLOCK_M=32, BLOCK_K=64),
                device_index=_grid_device(bits.device))(out, bits, rows, cols, bits.stride(0))
    return out.view(torch.bool)


# ----------------------------------------------------------------------------- shrink

class _ShrinkPlan:
    def __init__(self, x2d, lora_A, dropout_p, store_bits):
        T, K = x2d.shape
        R = lora_A.shape[0]
        block_m, block_k, warps, stages = _shrink_config(T, K, R, x2d.element_size(), x2d.device)
        threshold, scale_hi, scale_lo = _dropout_scalars(dropout_p)
        self.T, self.K, self.R = T, K, R
        self.acc_dtype = accumulation_dtype(x2d.dtype)
        self.store_bits = store_bits
        self.static = (T, K, R, x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), R, 1,
                       triton.cdiv(K, 8), threshold, scale_hi, scale_lo)
        self.launch = _Launch(
            _lora_shrink_kernel, (triton.cdiv(T, block_m),),
            dict(HAS_DROPOUT=dropout_p > 0.0, STORE_BITS=store_bits, K_ALIGNED=K % 8 == 0,
                 IS_FP64=x2d.dtype == torch.float64, INPUT_PRECISION=_input_precision(x2d.dtype),
                 BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(R)),
            dict(num_warps=warps, num_stages=stages), _grid_device(x2d.device))

    def __call__(self, x2d, lora_A, seed):
        xa = torch.empty((self.T, self.R), dtype=self.acc_dtype, device=x2d.device)
        bits = torch.empty((self.T, self.static[9]), dtype=torch.uint8, device=x2d.device) if self.store_bits else None
        self.launch(x2d, lora_A, xa, x2d if seed is None else seed, xa if bits is None else bits, *self.static)
        return xa, bits


def lora_shrink(x2d, lora_A, seed, dropout_p):
    """``(xa, keep_bits)``: xa = D(x) A^T (T, r) in the accumulation dtype; keep_bits the packed
    mask (T, ceil(K/8)) uint8 when dropout is on and the mask mode is "bits", else None."""
    store_bits = saves_keep_bits("triton", dropout_p, x2d.dtype)
    key = (x2d.device, x2d.dtype, lora_A.dtype, x2d.shape, x2d.stride(), lora_A.shape, lora_A.stride(),
           _aligned(x2d), _aligned(lora_A), dropout_p, store_bits, torch.backends.cuda.matmul.allow_tf32)
    plan = _SHRINK_PLANS.get(key)
    if plan is None:
        plan = _SHRINK_PLANS.put(key, _ShrinkPlan(x2d, lora_A, dropout_p, store_bits))
    if dropout_p > 0.0 and not (isinstance(seed, torch.Tensor) and seed.device == x2d.device and _aligned(seed)):
        seed = _seed_tensor(seed, x2d.device)
    return plan(x2d, lora_A, seed if dropout_p > 0.0 else None)


# ----------------------------------------------------------------------------- GEMM strategies

def _tma_possible(device: torch.device, dtype: torch.dtype, rank: int) -> bool:
    if TensorDescriptor is None or dtype not in (torch.float16, torch.bfloat16) or rank_block(rank) > TMA_MAX_RANK_BLOCK:
        return False
    if interpreting():
        return force_tma()
    return device.type == "cuda" and _device_facts(_index(device))[1] >= 9


def _tma_rows_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can address: unit column stride, 16-byte aligned base and row stride."""
    return (t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and _aligned(t)
            and t.shape[0] > 0 and t.shape[1] > 0)


def _descriptor_factory(tensor, shape, strides, block_shape):
    """A function tensor -> TensorDescriptor with this geometry (validated once, here).

    NOTE: TensorDescriptor's constructor re-validates every field (a few microseconds);
    a plan builds one template and only swaps the base tensor per call.
    """
    template = TensorDescriptor(tensor, list(shape), list(strides), list(block_shape))
    if not hasattr(template, "__dict__"):
        return lambda t: TensorDescriptor(t, list(shape), list(strides), list(block_shape))
    fields = dict(template.__dict__)
    cls = type(template)

    def make(t):
        desc = object.__new__(cls)
        desc.__dict__.update(fields)
        desc.base = t
        return desc

    return make


def _persistent_programs(tiles: int, device) -> int:
    if device.type == "cuda":
        return max(1, min(tiles, _device_facts(_index(device))[0]))
    return max(1, min(tiles, 3))  # the interpreter: several tiles per program


def _persistent_tma_launch(kernel, config: GemmConfig, rows: int, cols: int, dtype, device, constexprs: dict):
    """(output descriptor factory, launch) of a persistent TMA GEMM writing a (rows, cols) tensor.

    The config's BLOCK_M x BLOCK_N is the output tile; EPILOGUE_SUBTILE stores it in two halves.
    """
    tiles = triton.cdiv(rows, config.BLOCK_M) * triton.cdiv(cols, config.BLOCK_N)
    programs = _persistent_programs(tiles, device)
    store_cols = config.BLOCK_N // 2 if config.EPILOGUE_SUBTILE else config.BLOCK_N
    out_desc = _descriptor_factory(torch.empty(16, dtype=dtype, device=device), (rows, cols), (cols, 1),
                                   (config.BLOCK_M, store_cols))
    launch = _Launch(kernel, (programs,),
                     dict(constexprs, NUM_PROGRAMS=programs, EPILOGUE_SUBTILE=config.EPILOGUE_SUBTILE,
                          WARP_SPECIALIZE=config.WARP_SPECIALIZE),
                     dict(num_warps=config.num_warps, num_stages=config.num_stages), _grid_device(device))
    return out_desc, launch


# The configs the tuner times, by index into TMA_GEMM_CONFIGS / POINTER_GEMM_CONFIGS: a few,
# since each costs a compilation on a fresh machine (bench/gpu_kernels.py times them all).
# The dx kernel with dropout needs more shared memory in its epilogue (kernels/common.py).
TUNED_TMA = {("long", None): (0, 1, 2), ("long", "bits"): (2, 1), ("long", "seed"): (1,),
             ("short", None): (4, 1), ("short", "bits"): (4, 1), ("short", "seed"): (4, 1)}
TUNED_POINTER = {"long": (0, 1, 2), "short": (2, 3)}
# NOTE: the persistent loop's pipeliner multi-buffers the epilogue's fp32 rank tiles (xa, lora_B /
# dxa, lora_A) in shared memory: at BLOCK_R = 64 every TMA config overflows sm_90's 227 KiB
# (compiled: 262-311 KiB). Larger ranks take the pointer kernels or the cuBLAS hybrid.
TMA_MAX_RANK_BLOCK = 16


def _gemm_candidates(device, dtype, block_r, tma_ok, rows, mask=None):
    """[(label, kind, config)] the tuner may time; the first is the heuristic default.

    ``mask``: None (no dropout), "bits" or "seed": how the dx epilogue gets its mask.
    """
    if interpreting():
        config = INTERPRETER_GEMM_CONFIG
        return ([("tma:" + config.label(), "tma", config)] if tma_ok else []) + \
               [("pointer:" + config.label(), "pointer", config)]
    limit = _device_facts(_index(device))[2]
    element_size = torch.empty((), dtype=dtype).element_size()
    length = "short" if rows <= 256 else "long"
    if tma_ok:
        kind, configs = "tma", [TMA_GEMM_CONFIGS[i] for i in TUNED_TMA[length, mask]]
    else:
        kind, configs = "pointer", [POINTER_GEMM_CONFIGS[i] for i in TUNED_POINTER[length]]
    fitting = fitting_gemm_configs(configs, element_size, block_r, limit)
    candidates = [(f"{kind}:" + c.label(), kind, c) for c in fitting]
    if dtype != torch.float64:  # cuBLAS's fp64 GEMM is no faster than the fused one where fp64 matters
        expand = fitting_gemm_configs(POINTER_GEMM_CONFIGS, element_size, block_r, limit)[0]
        candidates.append(("hybrid", "hybrid", expand))
    return candidates


def _default_candidate(candidates, rows):
    """The heuristic choice: the first candidate (the preferred kind's first config for this length)."""
    return candidates[0]


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=15, return_mode="median")


def _choose(op_key, candidates, build, run_args, rows, device):
    """The strategy for one plan: tuned once per shape class, else the heuristic default.

    ``build(kind, config)`` returns a callable strategy; ``run_args()`` gives fresh
    arguments to time it on. A candidate that fails to compile is skipped.
    """
    with _TUNE_LOCK:
        label = _TUNED.get(op_key)
        by_label = {c[0]: c for c in candidates}
        if label in by_label:
            _, kind, config = by_label[label]
            return label, build(kind, config)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        tune = device.type == "cuda" and autotuning() and not capturing and len(candidates) > 1
        if not tune and compile_only() and not capturing and device.type == "cuda":
            for _, kind, config in candidates:
                try:
                    build(kind, config)(*run_args())
                except Exception:  # noqa: BLE001 - the timing run would skip it too
                    pass
        if not tune:
            order = [_default_candidate(candidates, rows)] + [c for c in candidates]
            for label, kind, config in order:
                strategy = build(kind, config)
                if capturing:  # no trial launches inside a CUDA graph being captured
                    return label, strategy
                try:
                    strategy(*run_args())
                except Exception:  # noqa: BLE001 - a config this GPU or Triton cannot build: next one
                    if device.type != "cuda":
                        raise
                    continue
                if not capturing:
                    _TUNED[op_key] = label
                return label, strategy
            raise RuntimeError(f"fused_lora: no GEMM strategy could run for {op_key}")
        best = None
        for label, kind, config in candidates:
            strategy = build(kind, config)
            args = run_args()
            try:
                strategy(*args)
                torch.cuda.synchronize(device)
                elapsed = _time_ms(lambda: strategy(*args))
            except Exception:  # noqa: BLE001 - skip what does not compile or fit
                continue
            if best is None or elapsed < best[0]:
                best = (elapsed, label, strategy)
        if best is None:
            raise RuntimeError(f"fused_lora: no GEMM strategy could run for {op_key}")
        _TUNED[op_key] = best[1]
        return best[1], best[2]


def _shape_class(rows: int) -> int:
    """Rows rounded up to a power of two (>= 16): one tuning run serves a range of T."""
    return max(16, triton.next_power_of_2(rows))


# ----------------------------------------------------------------------------- forward GEMM

class _ForwardPlan:
    def __init__(self, x2d, weight, bias, lora_B, xa, scaling):
        T, K = x2d.shape
        N, R = lora_B.shape
        self.T, self.N = T, N
        self.device = x2d.device
        self.dtype = x2d.dtype
        self.has_bias = bias is not None
        self.scaling = scaling
        self.block_r = rank_block(R)
        self.tma_ok = (_tma_possible(x2d.device, x2d.dtype, R) and _tma_rows_ok(x2d) and _tma_rows_ok(weight)
                       and (N * x2d.element_size()) % 16 == 0)
        candidates = _gemm_candidates(x2d.device, x2d.dtype, self.block_r, self.tma_ok, T)
        op_key = ("forward", x2d.device, x2d.dtype, lora_B.dtype, N, K, R, self.has_bias, self.tma_ok,
                  _shape_class(T))

        def run_args():
            return x2d, weight, bias, lora_B, xa, torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)

        self.label, self.strategy = _choose(op_key, candidates, lambda kind, config: self._build(
            kind, config, x2d, weight, lora_B, xa, scaling), run_args, T, x2d.device)

    def _build(self, kind, config: GemmConfig, x2d, weight, lora_B, xa, scaling):
        T, K = x2d.shape
        N, R = lora_B.shape
        device, dtype = x2d.device, x2d.dtype
        common = dict(HAS_BIAS=self.has_bias, BLOCK_R=self.block_r, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                      BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if kind == "tma":
            x_desc = _descriptor_factory(x2d, (T, K), x2d.stride(), (config.BLOCK_M, config.BLOCK_K))
            w_desc = _descriptor_factory(weight, (N, K), weight.stride(), (config.BLOCK_N, config.BLOCK_K))
            y_desc, launch = _persistent_tma_launch(_lora_fwd_tma_kernel, config, T, N, dtype, device, common)
            static = (T, N, K, R, xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), float(scaling))

            def tma(x2d, weight, bias, lora_B, xa, y):
                launch(x_desc(x2d), w_desc(weight), y_desc(y), weight if bias is None else bias, xa, lora_B, *static)

            return tma

        precision = _input_precision(dtype)
        scaling_hi, scaling_lo = _split_float(scaling)
        reduction = 0 if kind == "hybrid" else K
        grid = (triton.cdiv(T, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
        launch = _Launch(_lora_fwd_kernel, grid,
                         dict(common, IS_FP64=dtype == torch.float64, INPUT_PRECISION=precision),
                         options, _grid_device(device))
        static = (T, N, reduction, R, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
                  xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), N, 1, scaling_hi, scaling_lo)

        if kind == "hybrid":
            # NOTE: the low-rank term and the bias first, then cuBLAS adds x W^T into y (beta = 1).
            def hybrid(x2d, weight, bias, lora_B, xa, y):
                launch(x2d, weight, weight if bias is None else bias, xa, lora_B, y, *static)
                y.addmm_(x2d, weight.t())

            return hybrid

        def pointer(x2d, weight, bias, lora_B, xa, y):
            launch(x2d, weight, weight if bias is None else bias, xa, lora_B, y, *static)

        return pointer

    def __call__(self, x2d, weight, bias, lora_B, xa):
        y = torch.empty((self.T, self.N), dtype=self.dtype, device=self.device)
        self.strategy(x2d, weight, bias, lora_B, xa, y)
        return y


def lora_forward(x2d, weight, bias, lora_B, xa, scaling):
    if bias is not None and bias.stride(0) != 1:
        # NOTE: the kernels index the bias as bias_ptr + n; an expanded (stride 0) or strided
        # bias (N elements, a few KB) is copied rather than read at the wrong addresses.
        bias = bias.contiguous()
    key = (x2d.device, x2d.dtype, lora_B.dtype, x2d.shape, x2d.stride(), weight.stride(), lora_B.shape,
           lora_B.stride(), xa.stride(), bias is None or _aligned(bias), bias is None, _aligned(x2d), _aligned(weight),
           _aligned(lora_B), scaling, torch.backends.cuda.matmul.allow_tf32)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.put(key, _ForwardPlan(x2d, weight, bias, lora_B, xa, scaling))
    return plan(x2d, weight, bias, lora_B, xa)


# ----------------------------------------------------------------------------- backward

class _BackwardPlan:
    def __init__(self, dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, from_bits,
                 needs_dx, needs_dA, needs_dB):
        T, N = dy.shape
        R, K = lora_A.shape
        device, dtype = dy.device, dy.dtype
        self.T, self.N, self.K, self.R = T, N, K, R
        self.device, self.dtype = device, dtype
        self.acc_dtype = accumulation_dtype(dtype)
        self.needs = (needs_dx, needs_dA, needs_dB)
        self.lora_dtypes = (lora_A.dtype, lora_B.dtype)
        is_fp64 = dtype == torch.float64
        precision = _input_precision(dtype)
        block_r = rank_block(R)
        needs_dxa = needs_dx or needs_dA
        has_dropout = dropout_p > 0.0
        threshold, dscale_hi, dscale_lo = _dropout_scalars(dropout_p)
        scaling_hi, scaling_lo = _split_float(scaling)
        gd = _grid_device(device)

        # Step 3: the dy pass, a grid of column blocks x row splits.
        dy_m, dy_n, dy_warps, dy_stages = _dy_config(T, N, R, dy.element_size(), device)
        n_splits = triton.cdiv(N, dy_n)
        m_splits = _splits(triton.cdiv(T, dy_m), n_splits, device)
        rows_per_split = triton.cdiv(triton.cdiv(T, dy_m), m_splits) * dy_m
        m_splits = triton.cdiv(T, rows_per_split)
        self.n_splits, self.m_splits = n_splits, m_splits
        self.dy_launch = _Launch(
            _lora_bwd_dy_kernel, (n_splits, m_splits),
            dict(NEEDS_DXA=needs_dxa, NEEDS_DB=needs_dB, IS_FP64=is_fp64, INPUT_PRECISION=precision,
                 BLOCK_M=dy_m, BLOCK_N=dy_n, BLOCK_R=block_r),
            dict(num_warps=dy_warps, num_stages=dy_stages), gd)
        self.dy_static = (T, N, R, rows_per_split, dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
                          xa.stride(0), xa.stride(1), T * R, R, 1, N * R, R, 1)
        reduce_block = 1024
        self.dxa_sum = _Launch(_sum_partials_kernel, (triton.cdiv(T * R, reduce_block),),
                               dict(IS_FP64=is_fp64, BLOCK=reduce_block), dict(num_warps=4), gd)
        self.dxa_sum_static = (n_splits, T * R, T * R, 1.0, 0.0)
        self.db_sum = _Launch(_sum_partials_kernel, (triton.cdiv(N * R, reduce_block),),
                              dict(IS_FP64=is_fp64, BLOCK=reduce_block), dict(num_warps=4), gd)
        self.db_sum_static = (m_splits, N * R, N * R, scaling_hi, scaling_lo)

        # Step 4: dx = dy W + scaling * D(dxa A).
        self.dx_label, self.dx_strategy = None, None
        if needs_dx:
            self.tma_ok = (_tma_possible(device, dtype, R) and _tma_rows_ok(dy) and _tma_rows_ok(weight)
                           and (K * dy.element_size()) % 16 == 0)
            mask = ("bits" if from_bits else "seed") if has_dropout else None
            candidates = _gemm_candidates(device, dtype, block_r, self.tma_ok, T, mask)
            op_key = ("dx", device, dtype, lora_A.dtype, N, K, R, has_dropout, from_bits, self.tma_ok,
                      _shape_class(T))
            dx_args = dict(threshold=threshold, dscale=(dscale_hi, dscale_lo), scaling=(scaling_hi, scaling_lo),
                           has_dropout=has_dropout, from_bits=from_bits, precision=precision, block_r=block_r)
            seed_dummy = torch.zeros((), dtype=torch.int64, device=device)
            bits_dummy = torch.ones((T, triton.cdiv(K, 8)), dtype=torch.uint8, device=device) if from_bits else None
            dxa_dummy = torch.zeros((T, R), dtype=self.acc_dtype, device=device)

            def run_args():
                return (dy, weight, dxa_dummy, lora_A, seed_dummy, bits_dummy,
                        torch.empty((T, K), dtype=dtype, device=device))

            self.dx_args = dx_args
            self.dx_label, self.dx_strategy = _choose(op_key, candidates, lambda kind, config: self._build_dx(
                kind, config, dy, weight, lora_A, dx_args), run_args, T, device)

        # Step 5: dA = scaling * dxa^T D(x), split over T.
        if needs_dA:
            da_m, da_k, da_warps, da_stages = _da_config(T, K, R, dy.element_size(), device)
            k_blocks = triton.cdiv(K, da_k)
            row_blocks = triton.cdiv(T, da_m)
            splits = _splits(row_blocks, k_blocks, device)
            rows_per_split = triton.cdiv(row_blocks, splits) * da_m
            self.da_splits = triton.cdiv(T, rows_per_split)
            self.da_launch = _Launch(
                _lora_bwd_da_kernel, (k_blocks, self.da_splits),
                dict(HAS_DROPOUT=has_dropout, MASK_FROM_BITS=from_bits, K_ALIGNED=K % 8 == 0, IS_FP64=is_fp64,
                     INPUT_PRECISION=precision, BLOCK_M=da_m, BLOCK_K=da_k, BLOCK_R=block_r),
                dict(num_warps=da_warps, num_stages=da_stages), gd)
            self.da_x_strides = None  # filled per call (x is the saved input; its strides are in the key)
            self.da_static_tail = (R * K, K, 1, triton.cdiv(K, 8), threshold, dscale_hi, dscale_lo)
            self.da_sum = _Launch(_sum_partials_kernel, (triton.cdiv(R * K, reduce_block),),
                                  dict(IS_FP64=is_fp64, BLOCK=reduce_block), dict(num_warps=4), gd)
            self.da_sum_static = (self.da_splits, R * K, R * K, scaling_hi, scaling_lo)
            self.da_rows_per_split = rows_per_split

    def _build_dx(self, kind, config: GemmConfig, dy, weight, lora_A, a):
        T, N, K, R = self.T, self.N, self.K, self.R
        device, dtype = self.device, self.dtype
        gd = _grid_device(device)
        # NOTE: dx's output tile is (rows, in_features): the config's BLOCK_N is the
        # kernel's BLOCK_K (output columns), its BLOCK_K the kernel's BLOCK_N (reduction).
        common = dict(HAS_DROPOUT=a["has_dropout"], MASK_FROM_BITS=a["from_bits"], K_ALIGNED=K % 8 == 0,
                      BLOCK_R=a["block_r"], BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_K, BLOCK_K=config.BLOCK_N,
                      GROUP_M=config.GROUP_M)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        bits_stride = triton.cdiv(K, 8)
        if kind == "tma":
            dy_desc = _descriptor_factory(dy, (T, N), dy.stride(), (config.BLOCK_M, config.BLOCK_K))
            w_desc = _descriptor_factory(weight, (N, K), weight.stride(), (config.BLOCK_K, config.BLOCK_N))
            dx_desc, launch = _persistent_tma_launch(_lora_bwd_dx_tma_kernel, config, T, K, dtype, device, common)
            static = (T, N, K, R, R, 1, lora_A.stride(0), lora_A.stride(1), bits_stride,
                      a["scaling"][0], a["threshold"], a["dscale"][0])

            def tma(dy, weight, dxa, lora_A, seed, bits, dx):
                launch(dy_desc(dy), w_desc(weight), dx_desc(dx), dxa, lora_A, seed, dxa if bits is None else bits,
                       *static)

            return tma

        reduction = 0 if kind == "hybrid" else N
        grid = (triton.cdiv(T, config.BLOCK_M) * triton.cdiv(K, config.BLOCK_N),)
        launch = _Launch(_lora_bwd_dx_kernel, grid,
                         dict(common, IS_FP64=dtype == torch.float64, INPUT_PRECISION=a["precision"]), options, gd)
        static = (T, reduction, K, R, dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), R, 1,
                  lora_A.stride(0), lora_A.stride(1), K, 1, bits_stride, a["scaling"][0], a["scaling"][1],
                  a["threshold"], a["dscale"][0], a["dscale"][1])

        if kind == "hybrid":
            def hybrid(dy, weight, dxa, lora_A, seed, bits, dx):
                launch(dy, weight, dxa, lora_A, dx, seed, dxa if bits is None else bits, *static)
                dx.addmm_(dy, weight)

            return hybrid

        def pointer(dy, weight, dxa, lora_A, seed, bits, dx):
            launch(dy, weight, dxa, lora_A, dx, seed, dxa if bits is None else bits, *static)

        return pointer

    def __call__(self, dy, x2d, weight, lora_A, lora_B, xa, seed, bits):
        T, N, K, R = self.T, self.N, self.K, self.R
        device, acc_dtype = self.device, self.acc_dtype
        needs_dx, needs_dA, needs_dB = self.needs
        needs_dxa = needs_dx or needs_dA
        dx = dA = dB = None
        seed = dy if seed is None else seed

        dxa = torch.empty((T, R), dtype=acc_dtype, device=device) if needs_dxa else xa
        if needs_dxa and self.n_splits > 1:
            dxa_parts = torch.empty((self.n_splits, T, R), dtype=acc_dtype, device=device)
        else:
            dxa_parts = dxa
        db_parts = torch.empty((self.m_splits, N, R), dtype=acc_dtype, device=device) if needs_dB else xa
        self.dy_launch(dy, lora_B, xa, dxa_parts, db_parts, *self.dy_static)
        if needs_dxa and self.n_splits > 1:
            self.dxa_sum(dxa_parts, dxa, *self.dxa_sum_static)
        if needs_dB:
            dB = torch.empty((N, R), dtype=self.lora_dtypes[1], device=device)
            self.db_sum(db_parts, dB, *self.db_sum_static)
        if needs_dx:
            dx = torch.empty((T, K), dtype=self.dtype, device=device)
            self.dx_strategy(dy, weight, dxa, lora_A, seed, bits, dx)
        if needs_dA:
            da_parts = torch.empty((self.da_splits, R, K), dtype=acc_dtype, device=device)
            self.da_launch(dxa, x2d, da_parts, seed, dxa if bits is None else bits, T, K, R, self.da_rows_per_split,
                           R, 1, x2d.stride(0), x2d.stride(1), *self.da_static_tail)
            dA = torch.empty((R, K), dtype=self.lora_dtypes[0], device=device)
            self.da_sum(da_parts, dA, *self.da_sum_static)
        return dx, dA, dB


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                  needs_dx, needs_dA, needs_dB):
    """``(dx, dA, dB)``, None for what is not needed. ``keep_bits``: the packed mask the shrink
    saved (None: the mask is regenerated from ``seed``)."""
    from_bits = dropout_p > 0.0 and keep_bits is not None
    key = (dy.device, dy.dtype, lora_A.dtype, lora_B.dtype, dy.shape, dy.stride(), weight.shape, weight.stride(),
           lora_A.shape, lora_A.stride(), lora_B.stride(), xa.stride(), None if x2d is None or not needs_dA else x2d.stride(),
           _aligned(dy), _aligned(weight), _aligned(lora_A), _aligned(lora_B),
           x2d is None or _aligned(x2d), scaling, dropout_p, from_bits, needs_dx, needs_dA, needs_dB,
           torch.backends.cuda.matmul.allow_tf32)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.put(key, _BackwardPlan(dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p,
                                                      from_bits, needs_dx, needs_dA, needs_dB))
    if dropout_p > 0.0 and not from_bits and not (isinstance(seed, torch.Tensor) and seed.device == dy.device
                                                  and _aligned(seed)):
        seed = _seed_tensor(seed, dy.device)
    return plan(dy, x2d, weight, lora_A, lora_B, xa, seed if dropout_p > 0.0 and not from_bits else None,
                keep_bits if from_bits else None)
