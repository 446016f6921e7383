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
        def config(T, features, R, element_size, device, lora_split=False):
            if name in CONFIG_OVERRIDES:
                return CONFIG_OVERRIDES[name]
            if interpreting():
                return 16, 32, 4, 1
            return heuristic(T, features, R, element_size, device, lora_split)
        return config
    return wrap


# NOTE on the skinny configs below: each was checked with `tools/compile_kernels.py --check` for
# sm_90 (no register spill, shared memory within 227 KiB) for 16-bit inputs with fp32 and 16-bit
# adapters and fp32 inputs at r = 8, 16, 32, 64 and 128, with Triton 3.9 and with 3.6 (the GPU
# image's), and fp64 inputs at r = 16 and 64 with 3.9, every mask mode. ``lora_split``: fp32
# adapters on a 16-bit input (launch._lora_precision's LORA_SPLIT), whose two-part tf32 dots need
# more registers. Triton 3.6 still spills a few fp64 shrink and dA variants (4-40 bytes).

@_skinny_config("shrink")
def _shrink_config(T, K, R, element_size, device, lora_split=False):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the shrink (``_shrink_splits``: how many
    programs share each row block's K)."""
    block_r = rank_block(R)
    if element_size == 8:
        block_m, block_k, warps = 32, 32, 4
    elif block_r > 64:
        block_m, block_k, warps = 32, 64, 8
    else:
        block_m, block_k, warps = 64, 128 if element_size == 2 else 64, 8
    if T * K * element_size < SHRINK_SPLIT_BYTES and triton.cdiv(T, block_m) < _programs_target(device):
        # NOTE: a small x: 16-row programs fill the device (a 64 MiB x read by 128 programs left
        # most SMs idle, measured on an H200: 36 us against 16), without a K split, so without
        # partial sums and a second launch; the lora_A reloads this costs stay in L2.
        # (8 warps, but 4 for fp32 adapters up to r = 64: at 4 warps ptxas spilled 68 bytes of an
        # fp16 r = 64 mask-from-seed variant with fp16 adapters, and 16-56 bytes at r = 128 with
        # fp32 adapters; at 8, fp32 adapters at r = 64 spilled 8 bytes.)
        block_m, block_k, warps = 16, min(block_k, 64), 4 if lora_split and block_r <= 64 else 8
    return block_m, block_k, warps, 3


# x bytes from which the shrink splits K across programs rather than shrink its row blocks.
SHRINK_SPLIT_BYTES = 8 << 20


def _shrink_splits(T, K, element_size, block_m, block_k, device) -> tuple[int, int]:
    """(splits, k_per_split): K cut into ``splits`` ranges of whole BLOCK_K steps so that
    row blocks x splits fill the device twice (one split for a small x)."""
    k_blocks = triton.cdiv(K, block_k)
    row_blocks = triton.cdiv(T, block_m)
    splits = 1
    if T * K * element_size >= SHRINK_SPLIT_BYTES and row_blocks < _programs_target(device):
        splits = min(k_blocks, triton.cdiv(_programs_target(device), row_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(K, k_per_split) if K else 1, k_per_split


@_skinny_config("dy")
def _dy_config(T, N, R, element_size, device, lora_split=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dy pass."""
    block_r = rank_block(R)
    if lora_split:  # (16 rows at r = 128: 32 spilled 56 bytes)
        return 16 if block_r > 64 else 32, 256 if block_r <= 16 else 128, 8, 2
    base = {2: 256, 4: 128}.get(element_size, 64)
    # The (BLOCK_N, BLOCK_R) dB accumulator stays in registers: at most 4096 fp32 values per 4 warps.
    block_n = min(base, max(16, 16384 // block_r // max(1, element_size // 2)))
    block_m = 64 if block_r <= 32 and element_size <= 2 else 32
    warps = 8 if block_n * block_r >= 4096 else 4
    if element_size == 8 and block_r > 16:
        block_m, warps = 16, 4
    if element_size == 4 and block_r > 16:
        # NOTE: ptxas spilled fp32 dy at 32 rows: 8 bytes at r = 32 (Triton 3.9), 6.5 KB at r = 64 (3.6).
        block_m, warps = 16, 4 if block_r <= 32 else warps
    return block_m, block_n, warps, 2


@_skinny_config("da")
def _da_config(T, K, R, element_size, device, lora_split=False):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the dA partials.

    NOTE: dxa (BLOCK_M, r) is read once per BLOCK_K columns: 128-wide blocks keep that L2 traffic
    at a quarter of x's bytes for bf16 x, fp32 dxa, r = 16."""
    block_r = rank_block(R)
    if element_size >= 4:  # fp32 on CUDA cores unless TF32 is allowed; fp64 (16 rows at r = 128: 32 spilled 600 bytes)
        return (16 if block_r > 64 else 32), 32, 4, 3
    if lora_split:
        return 32, 128 if block_r <= 64 else 64, 8, 3
    # 8 warps: at 4, the mask regenerated for odd K spilled 16-32 bytes at r = 16 (Triton 3.6) and r = 32 (3.9)
    return 64, 128 if block_r <= 64 else 64, 8, 3


def _splits(units: int, other_programs: int, device) -> int:
    """How many pieces to cut ``units`` row blocks into so the grid fills the device."""
    return max(1, min(units, triton.cdiv(_programs_target(device), max(1, other_programs))))



# The configs the tuner times, by index into TMA_GEMM_CONFIGS / POINTER_GEMM_CONFIGS; the first of
# each list is the heuristic default. A few, since each costs a compilation on a fresh machine
# (bench/gpu_kernels.py times them all). Chosen from `tools/compile_kernels.py --check`'s report for
# sm_90 (Triton 3.9, ptxas 13): none of them spills registers or passes 227 KiB of shared memory, with
# fp32 or 16-bit adapters, for every mask mode; tests/test_kernels_compile.py keeps it so.
# NOTE: 128x256 output tiles are for dx without dropout only: with a mask the prologue's keep tile
# beside the 128x256 fp32 accumulator spills (32-80 bytes), so dropout takes 128x128 tiles.
# NOTE: "-nf" configs do not flatten the persistent loop: flattened, the pipeliner multi-buffers
# the rank tiles the prologue loads (r = 64 with fp32 adapters: 295 KiB at 128x128, against 197),
# and the mask-from-seed prologue's layout conversion gets its own buffer (229 KiB at 128x128,
# r = 16, against 172). The defaults need at most 200 KiB (128x256, fp32 adapters).
TUNED_TMA = {
    # (rows, mask, rank block: <= 16 or <= 64)
    ("long", None, 16): (2, 1, 6), ("long", "bits", 16): (1, 7), ("long", "seed", 16): (7, 8),
    ("short", None, 16): (4, 1), ("short", "bits", 16): (4, 1), ("short", "seed", 16): (4, 7),
    ("long", None, 64): (7, 8), ("long", "bits", 64): (7, 8), ("long", "seed", 64): (7, 8),
    ("short", None, 64): (9, 8), ("short", "bits", 64): (9, 8), ("short", "seed", 64): (9, 8),
}
# (input element size, rows, mask), for every r <= 64. "seed-odd": the mask regenerated from the
# seed with K % 8 != 0 (one Philox call per element, not per 8): only 64x64 tiles and smaller stay
# in registers. 128x128 tiles take 8 warps (with 4 they hold 240-255 registers, no margin). fp32
# inputs compute on CUDA cores unless TF32 is allowed: 64-wide tiles (128-wide ones reach 252
# registers at r = 16 and spill at r = 64).
_POINTER_RULES = {
    2: {("long", None): (0, 5, 2), ("long", "drop"): (5, 6, 2), ("short", None): (2, 3), ("short", "drop"): (2, 3),
        ("long", "seed-odd"): (3, 9), ("short", "seed-odd"): (3, 9)},
    4: {("long", None): (8, 9), ("long", "drop"): (8, 9), ("short", None): (8, 9), ("short", "drop"): (8, 9),
        ("long", "seed-odd"): (9,), ("short", "seed-odd"): (9,)},
    8: {("long", None): (3, 8), ("long", "drop"): (3, 8), ("short", None): (8, 9), ("short", "drop"): (8, 9),
        ("long", "seed-odd"): (9,), ("short", "seed-odd"): (9,)},
}
TUNED_POINTER = {(size, length, mask): rules[length, "drop" if mask in ("bits", "seed") else mask]
                 for size, rules in _POINTER_RULES.items() for length in ("long", "short")
                 for mask in (None, "bits", "seed", "seed-odd")}
# Ranks above 64 (BLOCK_R 128): the prologue's rank tiles beside a 64x64 fp32 accumulator spill
# (fp32 inputs: 730-1220 bytes; 16-bit inputs with fp32 adapters, seed-odd: 12 bytes with Triton
# 3.6), so those take 32x64 tiles only (POINTER_GEMM_CONFIGS[9]: 72-168 registers, no spill); so do
# fp64 inputs from r = 32 (64x64: 8 bytes at r = 32 with Triton 3.9, 116 at r = 64 with 3.6).
WIDE_RANK_POINTER = 9
# NOTE: the rank tiles join the accumulator before the K loop (no rank tile is live in the
# pipelined loop), so r <= 64 fits the TMA kernels; larger ranks take the pointer kernels or the
# cuBLAS hybrid.
TMA_MAX_RANK_BLOCK = 64


def _rank_class(block_r: int) -> int:
    return 16 if block_r <= 16 else 64


def _dx_mask(has_dropout: bool, from_bits: bool, k_aligned: bool):
    """How the dx GEMM gets its mask, as ``_gemm_candidates`` names it: None (no dropout), "bits"
    (the shrink's packed keep bits), "seed" or, where K % 8 != 0, "seed-odd" (regenerated)."""
    if not has_dropout:
        return None
    return "bits" if from_bits else "seed" if k_aligned else "seed-odd"


def _gemm_candidates(device, dtype, block_r, tma_ok, rows, mask=None):
    """[(label, kind, config)] the tuner may time; the first is the heuristic default.

    ``mask``: None (no dropout), "bits", "seed" or "seed-odd" (the seed with K % 8 != 0): how
    the dx GEMM gets its mask (the forward GEMM: None).
    """
    if interpreting():
        config = INTERPRETER_GEMM_CONFIG
        return ([("tma:" + config.label(), "tma", config)] if tma_ok else []) + \
               [("pointer:" + config.label(), "pointer", config)]
    limit = _device_facts(_index(device))[2]
    element_size = torch.empty((), dtype=dtype).element_size()
    length = "short" if rows <= 256 else "long"
    pointer = [POINTER_GEMM_CONFIGS[i] for i in TUNED_POINTER[element_size, length, mask]]
    if (block_r > TMA_MAX_RANK_BLOCK and (element_size >= 4 or mask == "seed-odd")) or \
            (element_size == 8 and block_r > 16):
        pointer = [POINTER_GEMM_CONFIGS[WIDE_RANK_POINTER]]
    if tma_ok:
        kind, configs = "tma", [TMA_GEMM_CONFIGS[i] for i in TUNED_TMA[length, mask, _rank_class(block_r)]]
    else:
        kind, configs = "pointer", pointer
    fitting = fitting_gemm_configs(configs, element_size, block_r, limit)
    candidates = [(f"{kind}:" + c.label(), kind, c) for c in fitting]
    if dtype != torch.float64:  # cuBLAS's fp64 GEMM is no faster than the fused one where fp64 matters
        expand = fitting_gemm_configs(pointer, element_size, block_r, limit)[0]
        candidates.append(("hybrid", "hybrid", expand))
    return candidates


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


def _choose(op_key, candidates, build, run_args, device):
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
        default = candidates[0]  # the heuristic choice (_gemm_candidates puts it first)
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

