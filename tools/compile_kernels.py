"""Compile every Triton kernel ahead of time for a CUDA target and report its resources, no GPU needed.

    python tools/compile_kernels.py [--arch 90] [--dtypes bf16,fp16,fp32,fp64] [--ranks 16,64]
                                    [--adapters fp32,x] [--cases bf16:16:fp32,...] [--all-configs]
                                    [--check] [--only REGEX] [--jobs N] [--keep-going]

Catches what the interpreter cannot: type errors of the real compiler, layouts
that do not lower (tl.join / tl.reshape of the mask, the packed keep bits), fp64
dots, TMA descriptors, warp specialization, and configs whose shared memory does
not fit the target. Prints one line per compiled variant: registers, spill bytes
(stores / loads) and shared memory, and whether a launcher can pick it ("default":
the heuristic's choice or one of the tuner's candidates, ``fused_lora/ops/triton_ops/tuning.py``).

How the figures are made:

* Each variant is compiled with the specialisations the JIT makes at a launch: the
  kernel's own argument binder (``create_function_from_signature``, what
  ``JITFunction.run`` calls) is fed representative arguments (the launchers'
  strides and sizes at T=8192, K=N=4096, 16-byte aligned tensors), so unit strides
  become constexpr 1 and pointers and integers divisible by 16 get the
  divisibility attribute, exactly as at run time.
* Registers and spills are ptxas's own account (``ptxas -v``), captured from the
  ptxas run Triton makes for the cubin (``ptxas-blackwell`` for sm_90+ in Triton
  3.9, ``--gpu-name sm_90a``). When the kernel comes from Triton's cache, the PTX
  it kept is assembled again with the same options; either way the result is kept
  next to Triton's cache, so a second run costs nothing.
* Shared memory is Triton's figure for the launch (``metadata.shared``), the
  dynamic shared memory the kernel asks for.

``--check`` fails (exit 1) when a default variant spills or needs more shared
memory than the target has (227 KiB per block on sm_90); other variants are
reported only. ``tests/test_kernels_compile.py`` runs it on a representative set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The checkout this file is in, not whatever fused_lora the interpreter would find first
# (run as a script, sys.path[0] is tools/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_lora.kernels import dequant_4bit, dropout_mask, lora_bwd, lora_fwd, lora_fwd_4bit, lora_shrink  # noqa: E402
from fused_lora.kernels.common import GemmConfig, rank_block  # noqa: E402
from fused_lora.ops.triton_ops import tuning  # noqa: E402
from fused_lora.ops.triton_ops.dequant import dequant_launch_options  # noqa: E402
from fused_lora.ops.triton_ops.forward_4bit import forward_4bit_config, forward_4bit_launch_options  # noqa: E402
from fused_lora.ops.triton_ops.launch import _input_precision, _lora_precision  # noqa: E402
from fused_lora.philox import dropout_threshold  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
SMS = 132  # H100 SXM / H200
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                "i64": torch.int64, "u8": torch.uint8}
KERNELS = {fn.__name__: fn for fn in (
    lora_shrink._lora_shrink_kernel, lora_fwd._lora_fwd_kernel, lora_fwd._lora_fwd_tma_kernel,
    lora_bwd._lora_bwd_dy_kernel, lora_bwd._sum_partials_kernel, lora_bwd._lora_bwd_dx_kernel,
    lora_bwd._lora_bwd_dx_tma_kernel, lora_bwd._lora_bwd_da_kernel, dropout_mask._dropout_mask_kernel,
    dropout_mask._unpack_keep_bits_kernel, dequant_4bit._dequant_4bit_kernel, lora_fwd_4bit._lora_fwd_4bit_kernel)}
T_REP, K_REP, N_REP = 8192, 4096, 4096  # representative sizes: Llama-8B hidden size, 8k tokens
P_REP = 0.1


@dataclass
class Variant:
    """One compilation: a kernel, its runtime arguments (by name; tensors as ("ptr", dtype) or
    ("desc", dtype, shape, strides, block)), its constexprs and launch options."""

    label: str
    kernel: str
    args: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    default: bool = True


# ----------------------------------------------------------------------------- what the launchers pick

@contextlib.contextmanager
def sm90_device_facts():
    """Make tuning's heuristics answer for an sm_90 GPU with SMS multiprocessors (no GPU here)."""
    saved = tuning._device_facts, tuning._index, tuning._programs_target
    tuning._device_facts = lambda index: (SMS, 9, SHARED_MEMORY_LIMIT[90])
    tuning._index = lambda device: 0
    tuning._programs_target = lambda device: 2 * SMS
    try:
        yield torch.device("cuda", 0)
    finally:
        tuning._device_facts, tuning._index, tuning._programs_target = saved


def gemm_choices(dtype: str, rank: int, mask):
    """{(kind, config): True} the launcher can use for one GEMM: every candidate of
    ``tuning._gemm_candidates`` over short and long inputs, with and without TMA."""
    tdtype = TORCH_DTYPES[dtype]
    block_r = rank_block(rank)
    # TMA needs 16-byte rows: K % 8 == 0 for 16-bit inputs, so never the "seed-odd" mask
    tma = dtype in ("fp16", "bf16") and block_r <= tuning.TMA_MAX_RANK_BLOCK and mask != "seed-odd"
    found = {}
    with sm90_device_facts() as device:
        for rows, tma_ok in itertools.product((64, T_REP), (True, False) if tma else (False,)):
            for _, kind, config in tuning._gemm_candidates(device, tdtype, block_r, tma_ok, rows, mask):
                found[kind, config] = True
    return found


def skinny_choices(name: str, dtype: str, rank: int, features: int, lora_split: bool):
    """The distinct (BLOCK_M, BLOCK_X, warps, stages) a skinny pass's heuristic gives over T = 1 .. 64k."""
    heuristic = {"shrink": tuning._shrink_config, "dy": tuning._dy_config, "da": tuning._da_config}[name]
    size = TORCH_DTYPES[dtype].itemsize
    with sm90_device_facts() as device:
        return list(dict.fromkeys(heuristic(2 ** e, features, rank, size, device, lora_split) for e in range(17)))


# ----------------------------------------------------------------------------- the variants

def _masks(dtype, tma=False):
    """(has dropout, mask from bits, K aligned), as the launchers combine them."""
    masks = [(False, False, True), (True, False, True), (True, True, True), (True, False, False)]
    if dtype == "fp64":  # no packed bits for fp64 (backends.saves_keep_bits)
        masks = [m for m in masks if not m[1]]
    if tma:  # the TMA kernels need 16-byte rows: K % 8 == 0 for 16-bit inputs
        masks = [m for m in masks if m[2]]
    return masks


def _dropout_args(dropout):
    return dict(threshold=dropout_threshold(P_REP if dropout else 0.0), dropout_scale_hi=1 / (1 - P_REP) if dropout else 1.0,
                dropout_scale_lo=0.0)


def variants(cases, all_configs):
    """Every Variant to compile: what the launchers can pick (default=True), and with
    ``all_configs`` every GEMM config of the tables (default=False unless it can be picked)."""
    from fused_lora.kernels.common import POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS

    T, K, N = T_REP, K_REP, N_REP
    for dtype, rank, adapters_are in cases:
        R = rank
        block_r = rank_block(R)
        acc = "fp64" if dtype == "fp64" else "fp32"
        adapter = acc if adapters_are == "fp32" else dtype  # fp32: PEFT's default on 16-bit bases
        precision = _input_precision(TORCH_DTYPES[dtype])  # fp32: "ieee", torch's default (no TF32)
        lora = _lora_precision(TORCH_DTYPES[dtype], TORCH_DTYPES[adapter])
        gemm_lora = _lora_precision(TORCH_DTYPES[dtype], TORCH_DTYPES[adapter], gemm=True)
        common = dict(lora, IS_FP64=dtype == "fp64")  # the skinny passes
        gemm_common = dict(gemm_lora, IS_FP64=dtype == "fp64", INPUT_PRECISION=precision)  # pointer GEMMs
        tag = f"{dtype} r={rank}" + (f" {adapter} adapters" if dtype in ("fp16", "bf16") else "")
        is_16bit = dtype in ("fp16", "bf16")
        x, w, a, xa, u8, i64 = ("ptr", dtype), ("ptr", dtype), ("ptr", adapter), ("ptr", acc), ("ptr", "u8"), ("ptr", "i64")

        for dropout, bits, aligned in _masks(dtype):
            for block_m, block_k, warps, stages in skinny_choices("shrink", dtype, R, K if aligned else K - 1, lora["LORA_SPLIT"]):
                yield Variant(
                    f"shrink[{block_m}x{block_k}-w{warps}-s{stages}] {tag} mask={tuning._dx_mask(dropout, bits, aligned)}",
                    "_lora_shrink_kernel",
                    dict(x_ptr=x, a_ptr=a, xa_ptr=xa, seed_ptr=i64, bits_ptr=u8, T=T, K=K if aligned else K - 1, R=R,
                         k_per_split=K // 2, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_xas=T * R,
                         stride_xam=R, stride_xar=1, stride_bits=triton.cdiv(K, 8), **_dropout_args(dropout)),
                    dict(common, HAS_DROPOUT=dropout, STORE_BITS=bits, K_ALIGNED=aligned, BLOCK_M=block_m,
                         BLOCK_K=block_k, BLOCK_R=block_r), dict(num_warps=warps, num_stages=stages))

        for block_m, block_n, warps, stages in skinny_choices("dy", dtype, R, N, lora["LORA_SPLIT"]):
            yield Variant(f"bwd_dy[{block_m}x{block_n}-w{warps}-s{stages}] {tag}", "_lora_bwd_dy_kernel",
                          dict(dy_ptr=x, b_ptr=a, xa_ptr=xa, dxa_ptr=xa, db_ptr=xa, T=T, N=N, R=R, rows_per_split=T // 8,
                               stride_dym=N, stride_dyn=1, stride_bn=R, stride_br=1, stride_xam=R, stride_xar=1,
                               stride_dxas=T * R, stride_dxam=R, stride_dxar=1, stride_dbs=N * R, stride_dbn=R,
                               stride_dbr=1),
                          dict(common, NEEDS_DXA=True, NEEDS_DB=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r),
                          dict(num_warps=warps, num_stages=stages))
        for out in dict.fromkeys((acc, adapter, dtype)):
            yield Variant(f"sum_partials {acc}->{out}", "_sum_partials_kernel",
                          dict(partial_ptr=xa, out_ptr=("ptr", out), S=8, M=T * R, stride_s=T * R, scale_hi=1.0,
                               scale_lo=0.0),
                          dict(IS_FP64=dtype == "fp64", BLOCK=1024), dict(num_warps=4))
        for dropout, bits, aligned in _masks(dtype):
            for block_m, block_k, warps, stages in skinny_choices("da", dtype, R, K if aligned else K - 1, lora["LORA_SPLIT"]):
                yield Variant(
                    f"bwd_da[{block_m}x{block_k}-w{warps}-s{stages}] {tag} mask={tuning._dx_mask(dropout, bits, aligned)}",
                    "_lora_bwd_da_kernel",
                    dict(dxa_ptr=xa, x_ptr=x, da_partial_ptr=xa, seed_ptr=i64, bits_ptr=u8, T=T,
                         K=K if aligned else K - 1, R=R, rows_per_split=T // 8, stride_dxam=R, stride_dxar=1,
                         stride_xm=K, stride_xk=1, stride_ps=R * K, stride_pr=K, stride_pk=1,
                         stride_bits=triton.cdiv(K, 8), **_dropout_args(dropout)),
                    dict(common, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned, BLOCK_M=block_m,
                         BLOCK_K=block_k, BLOCK_R=block_r), dict(num_warps=warps, num_stages=stages))

        # The two GEMMs: every config a launcher can use, or with --all-configs every config.
        forward = gemm_choices(dtype, R, None)
        dx = {mask: gemm_choices(dtype, R, mask) for mask in (None, "bits", "seed", "seed-odd")}
        pointer_configs = {c for (kind, c) in itertools.chain(forward, *dx.values()) if kind != "tma"}
        tma_configs = {c for (kind, c) in itertools.chain(forward, *dx.values()) if kind == "tma"}
        pointer_all = POINTER_GEMM_CONFIGS if all_configs else [c for c in POINTER_GEMM_CONFIGS if c in pointer_configs]
        for config in pointer_all:
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            blocks = dict(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M)
            picked = any(kind != "tma" and c == config for (kind, c) in forward)
            yield Variant(f"fwd[{config.label()}] {tag}", "_lora_fwd_kernel",
                          dict(x_ptr=x, w_ptr=w, bias_ptr=x, xa_ptr=xa, b_ptr=a, y_ptr=x, T=T, N=N, K=K, R=R,
                               stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_xam=R, stride_xar=1,
                               stride_bn=R, stride_br=1, stride_ym=N, stride_yn=1, scaling_hi=2.0, scaling_lo=0.0),
                          dict(gemm_common, HAS_BIAS=True, BLOCK_R=block_r, **blocks), options, picked)
            dx_blocks = dict(BLOCK_M=config.BLOCK_M, BLOCK_K=config.BLOCK_N, BLOCK_N=config.BLOCK_K, GROUP_M=config.GROUP_M)
            for dropout, bits, aligned in _masks(dtype):
                mask = tuning._dx_mask(dropout, bits, aligned)
                picked = any(kind != "tma" and c == config for (kind, c) in dx[mask])
                k = K if aligned else K - 1
                yield Variant(f"bwd_dx[{config.label()}] {tag} mask={mask}",
                              "_lora_bwd_dx_kernel",
                              dict(dy_ptr=x, w_ptr=w, dxa_ptr=xa, a_ptr=a, dx_ptr=x, seed_ptr=i64, bits_ptr=u8, T=T, N=N,
                                   K=k, R=R, stride_dym=N, stride_dyn=1, stride_wn=k, stride_wk=1, stride_dxam=R,
                                   stride_dxar=1, stride_ar=k, stride_ak=1, stride_dxm=k, stride_dxk=1,
                                   stride_bits=triton.cdiv(k, 8), scaling_hi=2.0, scaling_lo=0.0,
                                   **_dropout_args(dropout)),
                              dict(gemm_common, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned,
                                   BLOCK_R=block_r, **dx_blocks), options, picked)

        if not is_16bit:
            continue
        tma_all = TMA_GEMM_CONFIGS if all_configs else [c for c in TMA_GEMM_CONFIGS if c in tma_configs]
        for config in tma_all:
            if block_r > tuning.TMA_MAX_RANK_BLOCK and not all_configs:
                continue
            yield from tma_variants(config, dtype, adapter, R, tag, forward, dx, gemm_lora)


def tma_variants(config: GemmConfig, dtype, adapter, R, tag, forward, dx, gemm_lora):
    """The persistent TMA kernels with one config (forward, and dx for each mask mode)."""
    T, K, N = T_REP, K_REP, N_REP
    block_r = rank_block(R)
    acc = "fp32"
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    flags = dict(gemm_lora, GROUP_M=config.GROUP_M, EPILOGUE_SUBTILE=config.EPILOGUE_SUBTILE,
                 WARP_SPECIALIZE=config.WARP_SPECIALIZE, FLATTEN=config.flatten(9), BLOCK_R=block_r)
    store_n = config.BLOCK_N // 2 if config.EPILOGUE_SUBTILE else config.BLOCK_N
    desc = lambda shape, block: ("desc", dtype, shape, (shape[1], 1), block)  # noqa: E731
    picked = ("tma", config) in forward
    yield Variant(f"fwd_tma[{config.label()}] {tag}", "_lora_fwd_tma_kernel",
                  dict(x_desc=desc((T, K), (config.BLOCK_M, config.BLOCK_K)),
                       w_desc=desc((N, K), (config.BLOCK_N, config.BLOCK_K)),
                       y_desc=desc((T, N), (config.BLOCK_M, store_n)),
                       bias_ptr=("ptr", dtype), xa_ptr=("ptr", acc), b_ptr=("ptr", adapter), T=T, N=N, K=K, R=R,
                       stride_xam=R, stride_xar=1, stride_bn=R, stride_br=1, scaling=2.0, num_programs=SMS),
                  dict(flags, HAS_BIAS=True, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K),
                  options, picked)
    for dropout, bits, aligned in _masks(dtype, tma=True):
        mask = tuning._dx_mask(dropout, bits, True)
        picked = ("tma", config) in dx[mask]
        yield Variant(f"bwd_dx_tma[{config.label()}] {tag} mask={mask}", "_lora_bwd_dx_tma_kernel",
                      dict(dy_desc=desc((T, N), (config.BLOCK_M, config.BLOCK_K)),
                           w_desc=desc((N, K), (config.BLOCK_K, config.BLOCK_N)),
                           dx_desc=desc((T, K), (config.BLOCK_M, store_n)),
                           dxa_ptr=("ptr", acc), a_ptr=("ptr", adapter), seed_ptr=("ptr", "i64"), bits_ptr=("ptr", "u8"),
                           T=T, N=N, K=K, R=R, stride_dxam=R, stride_dxar=1, stride_ar=K, stride_ak=1,
                           stride_bits=K // 8, scaling=2.0, threshold=dropout_threshold(P_REP if dropout else 0.0),
                           dropout_scale=1 / (1 - P_REP) if dropout else 1.0, num_programs=SMS),
                      dict(flags, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned, BLOCK_M=config.BLOCK_M,
                           BLOCK_N=config.BLOCK_K, BLOCK_K=config.BLOCK_N), options, picked)


def dequant_4bit_variants(dtypes):
    """The 4-bit dequantize into each 16/32-bit output dtype: nf4 / fp4, plain / nested (offset
    on the device or a host float) at Linear4bit's blocksize 64; nf4 nested at both ends (32, 4096);
    and the optional fused 4-bit forward (not a default): decode-sized T, nf4 nested at blocksize 64,
    the absmax per column (K % 64 == 0) and per element. A 4096x4096 weight."""
    n = K_REP * N_REP
    cases = [("nf4", True, True, 64), ("nf4", True, False, 64), ("nf4", False, False, 64), ("fp4", True, True, 64),
             ("fp4", False, False, 64), ("nf4", True, True, 32), ("nf4", True, True, 4096)]
    outputs = [d for d in dict.fromkeys(dtypes) if d in ("fp16", "bf16", "fp32")]
    for dtype, (quant_type, nested, offset_ptr, blocksize) in itertools.product(outputs, cases):
        constexprs, options = dequant_launch_options(blocksize, quant_type, nested, 256 if nested else 1, offset_ptr,
                                                     TORCH_DTYPES[dtype].itemsize)
        f32 = ("ptr", "fp32")
        yield Variant(f"dequant_4bit[{quant_type} bs={blocksize}] ->{dtype} nested={nested} offset_ptr={offset_ptr}",
                      "_dequant_4bit_kernel",
                      dict(packed_ptr=("ptr", "u8"), code_ptr=f32, absmax_ptr=("ptr", "u8") if nested else f32,
                           nested_code_ptr=f32, nested_absmax_ptr=f32, offset_ptr=f32, out_ptr=("ptr", dtype),
                           n_elements=n, n_bytes=(n + 1) // 2, n_blocks=-(-n // blocksize), offset=0.25),
                      constexprs, options)
    for dtype, (T, K) in itertools.product(outputs, [(16, K_REP), (64, K_REP + 4)]):
        config = forward_4bit_config(T, 64, K, TORCH_DTYPES[dtype].itemsize)
        precision = _input_precision(TORCH_DTYPES[dtype])
        lora = _lora_precision(TORCH_DTYPES[dtype], torch.float32, gemm=True)  # fp32 lora_B, PEFT's default
        constexprs, options = forward_4bit_launch_options(64, "nf4", True, 256, True, True, precision, lora, 16,
                                                          config)
        R, N = 16, N_REP
        f32 = ("ptr", "fp32")
        yield Variant(f"lora_fwd_4bit[{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}] {dtype} nf4 nested "
                      f"per_column={config['ABSMAX_PER_COLUMN']}", "_lora_fwd_4bit_kernel",
                      dict(x_ptr=("ptr", dtype), packed_ptr=("ptr", "u8"), code_ptr=f32, absmax_ptr=("ptr", "u8"),
                           nested_code_ptr=f32, nested_absmax_ptr=f32, offset_ptr=f32, bias_ptr=("ptr", dtype),
                           xa_ptr=f32, b_ptr=f32, y_ptr=("ptr", dtype), T=T, N=N, K=K, R=R, offset=0.25,
                           stride_xm=K, stride_xk=1, stride_xam=R, stride_xar=1, stride_bn=R, stride_br=1,
                           stride_ym=N, stride_yn=1, scaling=2.0),
                      constexprs, options)


def mask_variants():
    for aligned in (True, False):
        yield Variant(f"dropout_mask K%8={'0' if aligned else 'odd'}", "_dropout_mask_kernel",
                      dict(out_ptr=("ptr", "u8"), seed_ptr=("ptr", "i64"), T=T_REP, K=K_REP if aligned else K_REP - 1,
                           threshold=dropout_threshold(P_REP)),
                      dict(K_ALIGNED=aligned, BLOCK_M=32, BLOCK_K=64))
    yield Variant("unpack_keep_bits", "_unpack_keep_bits_kernel",
                  dict(out_ptr=("ptr", "u8"), bits_ptr=("ptr", "u8"), T=T_REP, K=K_REP, stride_bits=K_REP // 8),
                  dict(BLOCK_M=32, BLOCK_K=64))


# ----------------------------------------------------------------------------- compiling and measuring

def _argument(spec):
    """A representative runtime argument: small 16-byte aligned CPU tensors stand for pointers
    (the binder only looks at dtype and alignment), TensorDescriptors for descriptors."""
    if not isinstance(spec, tuple):
        return spec
    if spec[0] == "ptr":
        return torch.empty(16, dtype=TORCH_DTYPES[spec[1]])
    from triton.tools.tensor_descriptor import TensorDescriptor

    _, dtype, shape, strides, block = spec
    return TensorDescriptor(torch.empty(16, dtype=TORCH_DTYPES[dtype]), list(shape), list(strides), list(block))


def jit_specialisation(kernel, args: dict, constexprs: dict, options: dict, backend):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` builds them for these arguments."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(constexprs, **options)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    missing = [n for n in kernel.arg_names if n not in args and n not in constexprs]
    if missing:
        raise TypeError(f"{kernel.__name__}: no representative value for {missing}")
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, opts = binder(**{n: _argument(v) for n, v in args.items()}, **kwargs)
    if hasattr(kernel, "_pack_args"):  # Triton 3.9: exactly what run() does next
        parsed, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, opts)
        return signature, constants, attrs, parsed
    # Other versions: the same steps (flat arguments only; these kernels take no tuples).
    names = [p.name for p in kernel.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    constants = {(i,): bound[name] for i, name in enumerate(names) if signature[name] == "constexpr"}
    values = ["" if spec[0] == "constexpr" else spec[1] for spec in specialization]
    attrs = {(i,): backend.parse_attr(value) for i, value in enumerate(values) if isinstance(value, str)}
    return signature, constants, attrs, backend.parse_options(kwargs)


PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str):
    """(registers, spill stores, spill loads) from ``ptxas -v`` output (one kernel)."""
    registers = REGISTERS.search(log)
    spills = PTXAS_LINE.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register / spill report in the ptxas output:\n{log}")
    return int(registers.group(1)), int(spills.group(2)), int(spills.group(3))


def _ptxas_again(ptx: str, arch: int) -> str:
    """Assemble PTX with the ptxas Triton uses for ``arch`` and its options; the -v log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(arch)}", source, "-o", source + ".o"]
        return subprocess.run(command, check=True, capture_output=True, text=True).stderr


def _result_cache(compiled_hash: str) -> str:
    from triton import knobs

    folder = os.path.join(knobs.cache.dir, "fused_lora_resources")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, compiled_hash + ".json")


def compile_variant(variant: Variant, arch: int):
    """Compile one variant; {"shared", "registers", "spill_stores", "spill_loads", "seconds"} or {"error"}."""
    from triton import knobs
    from triton.compiler import compile as triton_compile, make_backend

    start = time.perf_counter()
    kernel = KERNELS[variant.kernel]
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        signature, constants, attrs, parsed = jit_specialisation(kernel, variant.args, variant.constexprs,
                                                                 variant.options, backend)
        source = ASTSource(kernel, signature, constants, attrs)
        log = io.StringIO()
        saved = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton_compile(source, target=target, options=parsed.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        cache = _result_cache(compiled.hash)
        if "Used " in log.getvalue():
            registers, stores, loads = parse_ptxas(log.getvalue())
        elif os.path.exists(cache):
            with open(cache) as f:
                registers, stores, loads = json.load(f)
        else:
            registers, stores, loads = parse_ptxas(_ptxas_again(compiled.asm["ptx"], arch))
        with open(cache, "w") as f:
            json.dump([registers, stores, loads], f)
    except Exception as error:  # report which variant failed
        return dict(error=f"{type(error).__name__}: {str(error)[:2000]}", seconds=time.perf_counter() - start)
    return dict(shared=compiled.metadata.shared, registers=registers, spill_stores=stores, spill_loads=loads,
                seconds=time.perf_counter() - start)


def _compile_in_worker(item):
    variant, arch = item
    return compile_variant(variant, arch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp64", help="comma-separated input dtypes")
    parser.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks")
    parser.add_argument("--adapters", default="fp32,x", help="adapter dtypes on 16-bit inputs: fp32 (PEFT's "
                        "default) and/or x (the input's dtype)")
    parser.add_argument("--cases", default="", help="instead of the product of the three above: comma-separated "
                        "DTYPE:RANK:ADAPTERS, e.g. bf16:16:fp32,fp32:64:fp32")
    parser.add_argument("--all-configs", action="store_true", help="every GEMM config of the tables, not only "
                        "those a launcher can pick (those are reported, never checked)")
    parser.add_argument("--check", action="store_true", help="fail if a default variant spills or needs more "
                        "shared memory than the target has")
    parser.add_argument("--only", default="", help="compile only variants whose label matches this regular "
                        "expression (re.search)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compilations at once")
    parser.add_argument("--keep-going", action="store_true", help="report every failure, not only the first")
    args = parser.parse_args(argv)
    if args.arch not in SHARED_MEMORY_LIMIT:
        parser.error(f"--arch: one of {sorted(SHARED_MEMORY_LIMIT)}, not {args.arch}")
    limit = SHARED_MEMORY_LIMIT[args.arch]
    if args.cases:
        cases = [tuple(case.split(":")) for case in args.cases.split(",")]
    else:
        cases = [(d, r, a) for d, r, a in itertools.product(args.dtypes.split(","), args.ranks.split(","),
                                                            args.adapters.split(","))
                 if not (a == "x" and d in ("fp32", "fp64"))]  # fp32 / fp64 inputs: "x" is "fp32"
    for case in cases:
        if len(case) != 3 or case[0] not in ("fp16", "bf16", "fp32", "fp64") or not case[1].isdigit() \
                or case[2] not in ("fp32", "x"):
            parser.error(f"a case is DTYPE:RANK:ADAPTERS with DTYPE in fp16, bf16, fp32, fp64 and ADAPTERS "
                         f"fp32 or x, not {':'.join(case)!r}")
    cases = [(d, int(r), a) for d, r, a in cases]
    todo = [v for v in itertools.chain(variants(cases, args.all_configs), mask_variants(),
                                       dequant_4bit_variants([case[0] for case in cases]))
            if re.search(args.only, v.label) and (v.default or args.all_configs)]
    seen, unique = set(), []
    for v in todo:  # the same kernel and config from two dtypes' lists (sum_partials) once
        key = (v.kernel, json.dumps(v.args, default=str, sort_keys=True), json.dumps(v.constexprs, sort_keys=True),
               json.dumps(v.options, sort_keys=True))
        if key not in seen:
            seen.add(key)
            unique.append(v)
    start = time.perf_counter()
    failures = problems = 0
    items = [(v, args.arch) for v in unique]
    if args.jobs > 1:
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs)
        results = pool.map(_compile_in_worker, items)
    else:
        pool, results = None, map(_compile_in_worker, items)
    print(f"{'sm_' + str(args.arch):<6} {'variant':<72} {'regs':>4} {'spill st/ld':>13} {'shared':>8}  "
          f"{'time':>5}  status", flush=True)
    try:
        for variant, result in zip(unique, results):
            role = "default" if variant.default else "other"
            if "error" in result:
                failures += 1
                print(f"FAILED {variant.label} ({role}): {result['error']}", flush=True)
                if not args.keep_going:
                    return 1
                continue
            status = []
            if result["spill_stores"] or result["spill_loads"]:
                status.append("SPILLS")
            if result["shared"] > limit:
                status.append(f"SHARED > {limit}")
            if status and variant.default:
                problems += 1
            print(f"{'sm_' + str(args.arch):<6} {variant.label:<72} {result['registers']:>4} "
                  f"{result['spill_stores']:>6}/{result['spill_loads']:<6} {result['shared']:>8}  "
                  f"{result['seconds']:5.1f}  {role}{' ' + ', '.join(status) if status else ''}", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary = (f"compiled {len(unique) - failures} kernel variants for sm_{args.arch} in "
               f"{time.perf_counter() - start:.0f} s; {problems} default variants spill or overflow shared memory")
    print(summary + (f"; {failures} FAILED" if failures else ""))
    return 1 if failures or (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
