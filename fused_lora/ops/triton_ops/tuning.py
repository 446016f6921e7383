"""Which config and strategy each triton launch uses.

* The skinny passes (shrink, dy pass, dA): a heuristic block shape per call shape
  (``_shrink_config``, ``_dy_config``, ``_da_config``), or ``CONFIG_OVERRIDES`` from a benchmark.
* The two GEMMs (forward y, backward dx): the candidates (TMA, pointer, the cuBLAS hybrid)
  and ``_choose``, which times them once per shape class on a GPU, or takes the heuristic
  default (``FUSED_LORA_AUTOTUNE=0``, the interpreter, a graph capture).
"""

from __future__ import annotations

import functools
import threading

import torch
import triton

from ...kernels.common import INTERPRETER_GEMM_CONFIG, POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS, fitting_gemm_configs, interpreting, rank_block
from .launch import _device_facts, _index, _programs_target, autotuning, compile_only

_TUNED: dict = {}  # (op, shape class) -> label of the chosen GEMM strategy
_TUNE_LOCK = threading.RLock()
CONFIG_OVERRIDES: dict = {}  # {"shrink": (BLOCK_M, BLOCK_K, warps, stages), "dy": ..., "da": ...}: benchmarks


def tuned_choices() -> dict:
    """{(op, shape class): strategy label} decided so far (benchmarks print it)."""
    return dict(_TUNED)



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

