"""Which config and strategy each triton launch uses.

* The skinny passes (shrink, dy pass, dA): a heuristic block shape per call shape
  (``_shrink_config``, ``_dy_config``, ``_da_config``), or ``CONFIG_OVERRIDES`` from a benchmark.
* The two GEMMs (forward y, backward dx): the candidates (TMA, pointer, the cuBLAS hybrid)
  and ``_choose``, which takes, once per shape class, the tuning file's choice
  (``tuning_file.py``, written by ``python -m bench.tune``) or the heuristic default. Only
  ``python -m bench.tune`` times candidates (``timing_runs()``): a training process never
  does, so every process and rank that reads the same file runs the same kernels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import threading
import time
import warnings

import torch
import triton

try:
    from triton.errors import TritonError
except ImportError:  # pragma: no cover - older Triton
    from triton.compiler.errors import CompilationError as TritonError

from ...kernels.common import INTERPRETER_GEMM_CONFIG, POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS, fitting_gemm_configs, interpreting, rank_block
from . import tuning_file
from .launch import _device_facts, _index, _programs_target, autotuning, compile_only

_TUNED: dict = {}  # (op, shape class) -> label of the chosen GEMM strategy
_REPORT: dict = {}  # (op, shape class) -> how it was chosen (tuning_report)
_TUNE_LOCK = threading.RLock()
_TIMING = 0  # > 0 inside timing_runs()
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: CUDA errors
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
CONFIG_OVERRIDES: dict = {}  # {"shrink": (BLOCK_M, BLOCK_K, warps, stages), "dy": ..., "da": ...}: benchmarks


def tuned_choices() -> dict:
    """{(op, shape class): strategy label} decided so far (benchmarks print it)."""
    return dict(_TUNED)


def tuning_report() -> dict:
    """{(op, shape class): {"choice": label, "source": where it came from, "timings_ms": {label: ms},
    "failures": {label: "ExceptionType: message"}}} for every GEMM decided so far in this process."""
    with _TUNE_LOCK:
        return copy.deepcopy(_REPORT)



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


@contextlib.contextmanager
def timing_runs():
    """Inside this block a GEMM whose shape class is not decided yet in this process times its
    candidates and keeps the fastest, ignoring the tuning file. For ``python -m bench.tune``,
    which writes the decisions to the tuning file; never inside a training step."""
    global _TIMING
    with _TUNE_LOCK:
        _TIMING += 1
    try:
        yield
    finally:
        with _TUNE_LOCK:
            _TIMING -= 1


def _time_ms(fn, device) -> float:
    """Median milliseconds per call of ``fn``: CUDA events around each call (perf_counter off a GPU).

    NOTE: no L2-flush buffer (triton.testing.do_bench allocates 256 MiB per call): tuning
    allocates nothing beyond the candidate's own arguments.
    """
    if device.type != "cuda":
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    fn()
    last.record()
    last.synchronize()
    repeats = max(5, min(100, int(20.0 / max(first.elapsed_time(last), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


_MEMORY_TEXT = ("out of memory", "cublas_status_alloc_failed")
_BUILD_TEXT = ("too many resources requested", "out of resource", "ptxas", "passmanager")
_DEVICE_TEXT = ("cuda error", "triton error [cuda]", "cublas_status", "cuda driver error", "illegal memory access",
                "illegal address", "unspecified launch failure", "misaligned address", "device-side assert")


def _failure_kind(error: BaseException, device) -> str:
    """What a candidate's failure means: "memory" (out of memory: stop trying), "device" (a CUDA
    error: the context may be unusable, so it propagates) or "build" (this candidate cannot be
    compiled or launched here: compile and lowering errors, resource limits; skipped)."""
    text = f"{type(error).__name__}: {error}".lower()
    if isinstance(error, _OUT_OF_MEMORY) or any(t in text for t in _MEMORY_TEXT):
        return "memory"
    if isinstance(error, TritonError) or any(t in text for t in _BUILD_TEXT):
        kind = "build"
    elif (_ACCELERATOR_ERROR is not None and isinstance(error, _ACCELERATOR_ERROR)) or any(t in text for t in _DEVICE_TEXT):
        return "device"
    else:
        kind = "build"
    if device.type == "cuda":
        try:  # a failure that left the context broken is a device error, whatever it said
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            return "device"
    return kind


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _device_error(error: BaseException, op_key, label: str) -> BaseException:
    """The error itself, with a note naming the candidate (raise it)."""
    if hasattr(error, "add_note"):
        error.add_note(f"fused_lora: raised by GEMM candidate {label} for {tuning_file.entry_key(op_key)}; "
                       f"after a CUDA error the context cannot be trusted, so no other candidate was tried")
    return error


def _skipped(op_key, label: str, error: BaseException, failures: dict) -> None:
    failures[label] = _describe(error)
    warnings.warn(f"fused_lora: GEMM candidate {label} for {tuning_file.entry_key(op_key)} cannot run here and is "
                  f"skipped: {failures[label]}", RuntimeWarning, stacklevel=4)


def _record(op_key, label: str, source: str, timings=None, failures=None) -> None:
    _TUNED[op_key] = label
    _REPORT[op_key] = dict(choice=label, source=source, timings_ms=dict(timings or {}), failures=dict(failures or {}))


def _nothing_ran(op_key, failures: dict) -> RuntimeError:
    tried = "; ".join(f"{label}: {why}" for label, why in failures.items()) or "no candidates"
    return RuntimeError(f"fused_lora: no GEMM strategy could run for {tuning_file.entry_key(op_key)} ({tried})")


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _choose(op_key, candidates, build, run_args, rows, device):
    """The strategy for one plan: ``(label, callable)``, decided once per shape class.

    Where the choice comes from, in order: the decision this process already made for the
    shape class; inside ``timing_runs()`` (``python -m bench.tune``), the fastest candidate,
    timed; the tuning file (``tuning_file.py``; not with ``FUSED_LORA_AUTOTUNE=0``); else the
    heuristic default. Inside a CUDA graph capture nothing runs or is timed, and a choice not
    known yet is the default, not remembered.

    ``build(kind, config)`` returns a callable strategy; ``run_args()`` allocates arguments to
    try or time it on, and is called only where something runs: when the choice is not known
    yet and there are several candidates (the default runs once there, so a default that
    cannot be built here falls back to the next candidate). What a candidate's failure does
    (``_failure_kind``): a compile, lowering or resource failure skips it with a warning
    naming it and the exception (``tuning_report()`` keeps them); a CUDA error propagates
    with a note naming it; running out of memory stops the trying and timing (the default,
    untried, with a warning).
    """
    with _TUNE_LOCK:
        by_label = {c[0]: c for c in candidates}
        label = _TUNED.get(op_key)
        if label in by_label:
            return label, build(*by_label[label][1:])
        default = _default_candidate(candidates, rows)
        capturing = _capturing(device)
        if compile_only():
            mode, source = "compile", "default (FUSED_LORA_AUTOTUNE=compile)"
        elif _TIMING > 0 and not capturing and len(candidates) > 1:
            mode, source = "time", "timed"
        elif not autotuning():
            mode, source = "default", "default (FUSED_LORA_AUTOTUNE=0)"
        else:
            mode = "default"
            label, source = tuning_file.lookup(op_key, device, list(by_label))
            if label is not None:
                _record(op_key, label, source)
                return label, build(*by_label[label][1:])
        if capturing:  # no trial launches inside a CUDA graph being captured
            return default[0], build(*default[1:])
        if mode == "default" and len(candidates) == 1:  # nothing to fall back to: its first call is the trial
            _record(op_key, default[0], source)
            return default[0], build(*default[1:])
        order = [default] + [c for c in candidates if c is not default]
        return _run_candidates(op_key, order, build, run_args, device, mode, source)


def _run_candidates(op_key, order, build, run_args, device, mode: str, source: str):
    """Run the candidates in ``order`` on one set of ``run_args()``: until one runs ("default"),
    each once ("compile"), or each timed ("time"); record and return the choice."""
    failures, timings, ran = {}, {}, {}
    stopped = None
    try:
        args = run_args()
    except Exception as error:  # noqa: BLE001
        if _failure_kind(error, device) != "memory":
            raise
        args, stopped = None, f"out of memory allocating the arguments to try {order[0][0]} on"
    if args is not None:
        for label, kind, config in order:
            try:
                strategy = build(kind, config)
                strategy(*args)
                if device.type == "cuda":  # a CUDA error of this candidate surfaces here, not in a later step
                    torch.cuda.synchronize(device)
                if mode == "time":
                    timings[label] = _time_ms(lambda: strategy(*args), device)
            except Exception as error:  # noqa: BLE001 - sorted by _failure_kind
                failure = _failure_kind(error, device)
                if failure == "device":
                    raise _device_error(error, op_key, label)
                if failure == "memory":
                    stopped = f"out of memory while running {label}"
                    break
                _skipped(op_key, label, error, failures)
                continue
            ran[label] = strategy
            if mode == "default":
                break
        del args
    untried = not ran
    if untried:
        fallback = next((c for c in order if c[0] not in failures), None) if stopped is not None else None
        if fallback is None:
            raise _nothing_ran(op_key, failures)
        ran[fallback[0]] = build(*fallback[1:])
    label = min(timings, key=timings.get) if mode == "time" and stopped is None else next(iter(ran))
    if stopped is not None:
        warnings.warn(f"fused_lora: {stopped} for {tuning_file.entry_key(op_key)}: no more candidates are run; "
                      f"{label} is used{', untried' if untried else ''}", RuntimeWarning, stacklevel=3)
        source = f"default ({stopped})"
    _record(op_key, label, source, timings, failures)
    return label, ran[label]


def _shape_class(rows: int) -> int:
    """Rows rounded up to a power of two (>= 16): one tuning run serves a range of T."""
    return max(16, triton.next_power_of_2(rows))

