"""Compile every Triton kernel ahead of time for a CUDA target, no GPU needed.

    python tools/compile_kernels.py [--arch 90] [--dtypes bf16,fp64] [--ranks 16,256] [--all-configs]

Catches what the interpreter cannot: type errors of the real compiler, layouts
that do not lower (tl.join / tl.reshape of the mask, the packed keep bits), fp64
dots, TMA descriptors, warp specialization, and configs whose shared memory does
not fit the target. Prints one line per compiled variant (shared memory,
registers, spills) and exits non-zero on the first failure.
"""

import argparse
import itertools
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_lora.kernels.common import (POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS,  # noqa: E402
                                       fitting_gemm_configs, rank_block)
from fused_lora.kernels.dequant_4bit import _dequant_4bit_kernel  # noqa: E402
from fused_lora.kernels.dropout_mask import _dropout_mask_kernel, _unpack_keep_bits_kernel  # noqa: E402
from fused_lora.kernels.lora_bwd import (_lora_bwd_da_kernel, _lora_bwd_dx_kernel,  # noqa: E402
                                         _lora_bwd_dx_tma_kernel, _lora_bwd_dy_kernel, _sum_partials_kernel)
from fused_lora.kernels.lora_fwd import _lora_fwd_kernel, _lora_fwd_tma_kernel  # noqa: E402
from fused_lora.kernels.lora_fwd_4bit import _lora_fwd_4bit_kernel  # noqa: E402
from fused_lora.kernels.lora_shrink import _lora_shrink_kernel  # noqa: E402
from fused_lora.ops.triton_ops.dequant import dequant_launch_options  # noqa: E402
from fused_lora.ops.triton_ops.forward_4bit import forward_4bit_config, forward_4bit_launch_options  # noqa: E402
from fused_lora.ops.triton_ops.tuning import TMA_MAX_RANK_BLOCK, TUNED_TMA, _da_config, _dy_config  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
FLOATS = {"dropout_scale_hi", "dropout_scale_lo", "scaling_hi", "scaling_lo", "scaling", "dropout_scale",
          "scale_hi", "scale_lo"}


def signature_of(kernel, types, constexprs):
    """Every argument: pointers / descriptors from ``types``, constexprs, fp32 floats, else i32 ints."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _desc(dtype, block):
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}]>"


def variants(dtypes, ranks, all_configs, limit):
    """(label, jit function, argument types, constexprs, options) to compile."""

    def gemm_configs(configs, dtype, block_r):
        fitting = fitting_gemm_configs(configs, ELEMENT_SIZE[dtype], block_r, limit)
        return fitting if all_configs else list(dict.fromkeys([fitting[0], fitting[-1]]))

    for dtype, rank in itertools.product(dtypes, ranks):
        size = ELEMENT_SIZE[dtype]
        block_r = rank_block(rank)
        acc = "fp64" if dtype == "fp64" else "fp32"
        precision = "ieee" if dtype in ("fp32", "fp64") else "tf32"
        common = dict(IS_FP64=dtype == "fp64", INPUT_PRECISION=precision)
        adapter = acc if dtype != "fp64" else dtype  # PEFT's default: fp32 adapters on 16-bit bases
        tag = f"{dtype} r={rank}"
        # (has dropout, mask from bits, K aligned)
        masks = [(False, False, True), (True, False, True), (True, True, True), (True, False, False)]
        if dtype == "fp64":  # no packed bits for fp64 (backends.saves_keep_bits)
            masks = [m for m in masks if not m[1]]

        block_k = {2: 128, 4: 64}.get(size, 32)
        if block_r > 64:
            block_k = min(block_k, 64)
        for block_m, (dropout, bits, aligned) in itertools.product((16, 64 if block_r <= 64 and size <= 4 else 32),
                                                                     masks):
            yield (f"shrink[{block_m}x{block_k}] {tag} dropout={dropout} bits={bits} aligned={aligned}",
                   _lora_shrink_kernel,
                   dict(x_ptr=f"*{dtype}", a_ptr=f"*{adapter}", xa_ptr=f"*{acc}", seed_ptr="*i64", bits_ptr="*u8"),
                   dict(common, HAS_DROPOUT=dropout, STORE_BITS=bits, K_ALIGNED=aligned, BLOCK_M=block_m,
                        BLOCK_K=block_k, BLOCK_R=block_r), dict(num_warps=4, num_stages=3))

        dy_m, dy_n, dy_warps, dy_stages = _dy_config(8192, 4096, rank, size, None)
        yield (f"bwd_dy[{dy_m}x{dy_n}] {tag}", _lora_bwd_dy_kernel,
               dict(dy_ptr=f"*{dtype}", b_ptr=f"*{adapter}", xa_ptr=f"*{acc}", dxa_ptr=f"*{acc}", db_ptr=f"*{acc}"),
               dict(common, NEEDS_DXA=True, NEEDS_DB=True, BLOCK_M=dy_m, BLOCK_N=dy_n, BLOCK_R=block_r),
               dict(num_warps=dy_warps, num_stages=dy_stages))
        for out in (acc, adapter, dtype):
            yield (f"sum_partials {acc}->{out}", _sum_partials_kernel, dict(partial_ptr=f"*{acc}", out_ptr=f"*{out}"),
                   dict(IS_FP64=dtype == "fp64", BLOCK=1024), dict(num_warps=4))

        da_m, da_k, da_warps, da_stages = _da_config(8192, 4096, rank, size, None)
        for dropout, bits, aligned in masks:
            yield (f"bwd_da[{da_m}x{da_k}] {tag} dropout={dropout} bits={bits} aligned={aligned}", _lora_bwd_da_kernel,
                   dict(dxa_ptr=f"*{acc}", x_ptr=f"*{dtype}", da_partial_ptr=f"*{acc}", seed_ptr="*i64", bits_ptr="*u8"),
                   dict(common, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned, BLOCK_M=da_m,
                        BLOCK_K=da_k, BLOCK_R=block_r), dict(num_warps=da_warps, num_stages=da_stages))

        for i, config in enumerate(gemm_configs(POINTER_GEMM_CONFIGS, dtype, block_r)):
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            blocks = dict(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M)
            yield (f"fwd[{config.label()}] {tag}", _lora_fwd_kernel,
                   dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", bias_ptr=f"*{dtype}", xa_ptr=f"*{acc}",
                        b_ptr=f"*{adapter}", y_ptr=f"*{dtype}"),
                   dict(common, HAS_BIAS=True, BLOCK_R=block_r, **blocks), options)
            dx_blocks = dict(BLOCK_M=config.BLOCK_M, BLOCK_K=config.BLOCK_N, BLOCK_N=config.BLOCK_K,
                             GROUP_M=config.GROUP_M)
            for dropout, bits, aligned in masks:
                yield (f"bwd_dx[{config.label()}] {tag} dropout={dropout} bits={bits} aligned={aligned}",
                       _lora_bwd_dx_kernel,
                       dict(dy_ptr=f"*{dtype}", w_ptr=f"*{dtype}", dxa_ptr=f"*{acc}", a_ptr=f"*{adapter}",
                            dx_ptr=f"*{dtype}", seed_ptr="*i64", bits_ptr="*u8"),
                       dict(common, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned, BLOCK_R=block_r,
                            **dx_blocks), options)

        if size != 2 or block_r > TMA_MAX_RANK_BLOCK:
            continue
        # The configs the launcher may pick (TUNED_TMA), or with --all-configs every one.
        used = {mask: sorted({i for (_, m), ids in TUNED_TMA.items() if m == mask for i in ids})
                for mask in (None, "bits", "seed")}
        everything = range(len(TMA_GEMM_CONFIGS))
        for index in sorted(set(everything) if all_configs else set().union(*used.values())):
            config = TMA_GEMM_CONFIGS[index]
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            flags = dict(GROUP_M=config.GROUP_M, NUM_PROGRAMS=132, EPILOGUE_SUBTILE=config.EPILOGUE_SUBTILE,
                         WARP_SPECIALIZE=config.WARP_SPECIALIZE, BLOCK_R=block_r)
            store_n = config.BLOCK_N // 2 if config.EPILOGUE_SUBTILE else config.BLOCK_N
            if all_configs or index in used[None]:
                yield (f"fwd_tma[{config.label()}] {tag}", _lora_fwd_tma_kernel,
                       dict(x_desc=_desc(dtype, (config.BLOCK_M, config.BLOCK_K)),
                            w_desc=_desc(dtype, (config.BLOCK_N, config.BLOCK_K)),
                            y_desc=_desc(dtype, (config.BLOCK_M, store_n)),
                            bias_ptr=f"*{dtype}", xa_ptr=f"*{acc}", b_ptr=f"*{adapter}"),
                       dict(flags, HAS_BIAS=True, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                            BLOCK_K=config.BLOCK_K), options)
            for dropout, bits, aligned in masks[:3]:
                mask = ("bits" if bits else "seed") if dropout else None
                if not all_configs and index not in used[mask]:
                    continue
                yield (f"bwd_dx_tma[{config.label()}] {tag} dropout={dropout} bits={bits}", _lora_bwd_dx_tma_kernel,
                       dict(dy_desc=_desc(dtype, (config.BLOCK_M, config.BLOCK_K)),
                            w_desc=_desc(dtype, (config.BLOCK_K, config.BLOCK_N)),
                            dx_desc=_desc(dtype, (config.BLOCK_M, store_n)),
                            dxa_ptr=f"*{acc}", a_ptr=f"*{adapter}", seed_ptr="*i64", bits_ptr="*u8"),
                       dict(flags, HAS_DROPOUT=dropout, MASK_FROM_BITS=bits, K_ALIGNED=aligned,
                            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_K, BLOCK_K=config.BLOCK_N), options)
    for aligned in (True, False):
        yield (f"dropout_mask aligned={aligned}", _dropout_mask_kernel, dict(out_ptr="*u8", seed_ptr="*i64"),
               dict(K_ALIGNED=aligned, BLOCK_M=32, BLOCK_K=64), {})
    yield ("unpack_keep_bits", _unpack_keep_bits_kernel, dict(out_ptr="*u8", bits_ptr="*u8"),
           dict(BLOCK_M=32, BLOCK_K=64), {})
    yield from dequant_4bit_variants(dtypes)


def dequant_4bit_variants(dtypes):
    """The 4-bit dequantize into each 16/32-bit output dtype: nf4 / fp4, plain / nested (offset
    on the device or a host float) at Linear4bit's blocksize 64; nf4 nested at both ends (32, 4096)."""
    cases = [("nf4", True, True, 64), ("nf4", True, False, 64), ("nf4", False, False, 64), ("fp4", True, True, 64),
             ("fp4", False, False, 64), ("nf4", True, True, 32), ("nf4", True, True, 4096)]
    for dtype, (quant_type, nested, offset_ptr, blocksize) in itertools.product(
            [d for d in dtypes if d in ("fp16", "bf16", "fp32")], cases):
        absmax = "*u8" if nested else "*fp32"
        constexprs, options = dequant_launch_options(blocksize, quant_type, nested, 256, offset_ptr, ELEMENT_SIZE[dtype])
        yield (f"dequant_4bit[{quant_type} bs={blocksize}] ->{dtype} nested={nested} offset_ptr={offset_ptr}",
               _dequant_4bit_kernel,
               dict(packed_ptr="*u8", code_ptr="*fp32", absmax_ptr=absmax, nested_code_ptr="*fp32",
                    nested_absmax_ptr="*fp32", offset_ptr="*fp32", out_ptr=f"*{dtype}", offset="fp32"),
               constexprs, options)
    # The optional fused 4-bit forward (not a default): decode-sized T, nf4 nested at blocksize 64,
    # the absmax per column (K % 64 == 0) and per element.
    half_or_single = [d for d in dtypes if d in ("fp16", "bf16", "fp32")]
    for dtype, (T, K) in itertools.product(half_or_single, [(16, 4096), (64, 4100)]):
        config = forward_4bit_config(T, 64, K, ELEMENT_SIZE[dtype])
        precision = "ieee" if dtype == "fp32" else "tf32"
        constexprs, options = forward_4bit_launch_options(64, "nf4", True, 256, True, True, precision, 16, config)
        yield (f"lora_fwd_4bit[{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}] {dtype} nf4 nested "
               f"per_column={config['ABSMAX_PER_COLUMN']}", _lora_fwd_4bit_kernel,
               dict(x_ptr=f"*{dtype}", packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", nested_code_ptr="*fp32",
                    nested_absmax_ptr="*fp32", offset_ptr="*fp32", bias_ptr=f"*{dtype}", xa_ptr="*fp32",
                    b_ptr="*fp32", y_ptr=f"*{dtype}", offset="fp32", scaling="fp32"),
               constexprs, options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="fp16,bf16,fp32,fp64", help="comma-separated input dtypes")
    parser.add_argument("--ranks", default="16,256", help="comma-separated LoRA ranks")
    parser.add_argument("--all-configs", action="store_true", help="every config, not only both ends")
    parser.add_argument("--only", default="", help="compile only variants whose label contains this")
    parser.add_argument("--keep-going", action="store_true", help="report every failure, not only the first")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_MEMORY_LIMIT[args.arch]
    count = failures = 0
    for label, fn, types, constexprs, options in variants(args.dtypes.split(","), [int(r) for r in args.ranks.split(",")],
                                                           args.all_configs, limit):
        if args.only not in label:
            continue
        start = time.perf_counter()
        source = ASTSource(fn=fn, signature=signature_of(fn, types, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=target, options=options)
        except Exception as error:  # report which variant failed, then fail
            print(f"FAILED {label}: {type(error).__name__}: {error}", flush=True)
            failures += 1
            if not args.keep_going:
                return 1
            continue
        metadata = compiled.metadata
        shared = metadata.shared
        registers = getattr(compiled, "n_regs", None)
        status = "ok" if shared <= limit else f"TOO MUCH SHARED MEMORY (limit {limit})"
        print(f"sm_{args.arch} {label:<62} shared={shared:>6} B  {time.perf_counter() - start:5.1f}s  {status}",
              flush=True)
        if status != "ok":
            failures += 1
            if not args.keep_going:
                return 1
            continue
        count += 1
    print(f"compiled {count} kernel variants for sm_{args.arch}" + (f", {failures} FAILED" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
