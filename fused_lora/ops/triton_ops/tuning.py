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
# adapters, fp32 and fp64 inputs, r = 16 and 64, every mask mode. ``lora_split``: fp32 adapters
# on a 16-bit input (launch._lora_precision's LORA_SPLIT), whose two-part tf32 dots need more
# registers. Ranks above 64 keep smaller blocks, unchecked.

@_skinny_config("shrink")
def _shrink_config(T, K, R, element_size, device, lora_split=False):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the shrink (``_shrink_splits``: how many
    programs share each row block's K)."""
    block_r = rank_block(R)
    if element_size == 8:
        block_m, block_k, warps = 32, 32, 4
    elif block_r > 64:
        block_m, block_k, warps = 32, 64, 4
    else:
        block_m, block_k, warps = 64, 128 if element_size == 2 else 64, 8
    if T * K * element_size < SHRINK_SPLIT_BYTES and triton.cdiv(T, block_m) < _programs_target(device):
        # NOTE: a small x: 16-row programs fill the device (a 64 MiB x read by 128 programs left
        # most SMs idle, measured on an H200: 36 us against 16), without a K split, so without
        # partial sums and a second launch; the lora_A reloads this costs stay in L2.
        # (8 warps for 16-bit adapters: ptxas spilled 68 bytes of an fp16 r = 64 mask-from-seed
        # variant at 4 warps; 4 for fp32 adapters, where 8 spilled 8 bytes.)
        block_m, block_k, warps = 16, min(block_k, 64), 8 if element_size == 2 and not lora_split else 4
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
    if lora_split:
        return 32, 256 if block_r <= 16 else 128, 8, 2
    base = {2: 256, 4: 128}.get(element_size, 64)
    # The (BLOCK_N, BLOCK_R) dB accumulator stays in registers: at most 4096 fp32 values per 4 warps.
    block_n = min(base, max(16, 16384 // block_r // max(1, element_size // 2)))
    block_m = 64 if block_r <= 32 and element_size <= 2 else 32
    warps = 8 if block_n * block_r >= 4096 else 4
    if element_size == 8 and block_r > 16:
        block_m, warps = 16, 4
    return block_m, block_n, warps, 2


@_skinny_config("da")
def _da_config(T, K, R, element_size, device, lora_split=False):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the dA partials.

    NOTE: dxa (BLOCK_M, r) is read once per BLOCK_K columns: 128-wide blocks keep that L2 traffic
    at a quarter of x's bytes for bf16 x, fp32 dxa, r = 16."""
    block_r = rank_block(R)
    if element_size >= 4:  # fp32 on CUDA cores unless TF32 is allowed; fp64
        return 32, 32, 4, 3
    if lora_split:
        return 32, 128 if block_r <= 64 else 64, 8, 3
    return 64, 128 if block_r <= 64 else 64, 4, 3


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
# NOTE: the rank tiles join the accumulator before the K loop (no rank tile is live in the
# pipelined loop), so r <= 64 fits the TMA kernels; larger ranks take the pointer kernels or the
# cuBLAS hybrid.
TMA_MAX_RANK_BLOCK = 64


def _rank_class(block_r: int) -> int:
    return 16 if block_r <= 16 else 64


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

