"""Compile every Triton kernel ahead of time for a CUDA target, no GPU needed.

    python tools/compile_kernels.py [--arch 80|90] [--dtypes bf16,fp64] [--all-configs]

Catches what the interpreter cannot: type errors of the real compiler, layouts
that do not lower (tl.join / tl.reshape of the mask), fp64 dots, and configs
whose shared memory does not fit the target. Prints one line per compiled
variant and exits non-zero on the first failure.
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

from fused_lora.kernels.common import dy_pass_blocks, fitting_configs, lowrank_blocks  # noqa: E402
from fused_lora.kernels.dropout_mask import _dropout_mask_kernel  # noqa: E402
from fused_lora.kernels.lora_bwd import (DX_TILES, _lora_bwd_da_kernel, _lora_bwd_dx_kernel,  # noqa: E402
                                         _lora_bwd_dy_kernel)
from fused_lora.kernels.lora_fwd import FWD_TILES, _lora_fwd_kernel  # noqa: E402
from fused_lora.kernels.lora_shrink import _lora_shrink_kernel  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def signature_of(kernel, pointer_types, constexprs):
    """Every argument: pointers from ``pointer_types``, constexprs, else i32 ints / fp32 floats."""
    floats = {"dropout_scale_hi", "dropout_scale_lo", "scaling_hi", "scaling_lo"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def variants(dtypes, ranks, all_configs, limit):
    """(label, jit function, pointer types, constexprs, options) to compile.

    The autotuned GEMMs: the configs the autotuner's shared-memory pruning keeps
    for this dtype on a device with ``limit`` bytes (all of them, or the first).
    """

    def gemm_configs(kernel, tiles, dtype, block_r):
        configs = fitting_configs(kernel.configs, ELEMENT_SIZE[dtype], block_r, limit, *tiles)
        # The first fitting config, and the last one (what FUSED_LORA_AUTOTUNE=0 launches).
        return configs if all_configs else list(dict.fromkeys([configs[0], configs[-1]]))

    for dtype, rank, dropout, aligned in itertools.product(dtypes, ranks, (False, True), (True, False)):
        if not dropout and not aligned:
            continue
        block_r, block = lowrank_blocks(rank, ELEMENT_SIZE[dtype])
        dy_m, dy_n, dy_warps = dy_pass_blocks(rank, ELEMENT_SIZE[dtype])
        acc = "fp64" if dtype == "fp64" else "fp32"
        precision = "ieee" if dtype in ("fp32", "fp64") else "tf32"
        common = dict(IS_FP64=dtype == "fp64", INPUT_PRECISION=precision)
        masked = dict(HAS_DROPOUT=dropout, K_ALIGNED=aligned)
        tag = f"{dtype} r={rank} dropout={dropout} aligned={aligned}"
        yield (f"shrink {tag}", _lora_shrink_kernel,
               dict(x_ptr=dtype, a_ptr=acc if dtype != "fp64" else dtype, xa_ptr=acc),
               dict(common, **masked, BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r), {})
        yield (f"bwd_da {tag}", _lora_bwd_da_kernel, dict(dxa_ptr=acc, x_ptr=dtype, da_partial_ptr=acc),
               dict(common, **masked, BLOCK_M=block, BLOCK_K=block, BLOCK_R=block_r), {})
        for i, config in enumerate(gemm_configs(_lora_bwd_dx_kernel, DX_TILES, dtype, block_r)):
            yield (f"bwd_dx[{i}] {tag}", _lora_bwd_dx_kernel.fn,
                   dict(dy_ptr=dtype, w_ptr=dtype, dxa_ptr=acc, a_ptr=dtype, dx_ptr=dtype),
                   dict(common, **masked, BLOCK_R=block_r, **config.kwargs),
                   dict(num_warps=config.num_warps, num_stages=config.num_stages))
        if not dropout or not aligned:
            continue
        for i, config in enumerate(gemm_configs(_lora_fwd_kernel, FWD_TILES, dtype, block_r)):
            yield (f"fwd[{i}] {dtype} r={rank}", _lora_fwd_kernel.fn,
                   dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=dtype, xa_ptr=acc, b_ptr=dtype, y_ptr=dtype),
                   dict(common, HAS_BIAS=True, BLOCK_R=block_r, **config.kwargs),
                   dict(num_warps=config.num_warps, num_stages=config.num_stages))
        yield (f"bwd_dy[{dy_m}x{dy_n}] {dtype} r={rank}", _lora_bwd_dy_kernel,
               dict(dy_ptr=dtype, b_ptr=dtype, xa_ptr=acc, dxa_ptr=acc, db_partial_ptr=acc),
               dict(common, NEEDS_DXA=True, NEEDS_DB=True, BLOCK_M=dy_m, BLOCK_N=dy_n, BLOCK_R=block_r),
               dict(num_warps=dy_warps))
    yield ("dropout_mask aligned", _dropout_mask_kernel, dict(out_ptr="u8"),
           dict(K_ALIGNED=True, BLOCK_M=32, BLOCK_K=64), {})
    yield ("dropout_mask unaligned", _dropout_mask_kernel, dict(out_ptr="u8"),
           dict(K_ALIGNED=False, BLOCK_M=32, BLOCK_K=64), {})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", default="fp16,bf16,fp32,fp64", help="comma-separated input dtypes")
    parser.add_argument("--ranks", default="16,256", help="comma-separated LoRA ranks")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_MEMORY_LIMIT[args.arch]
    count = 0
    for label, fn, pointers, constexprs, options in variants(args.dtypes.split(","), [int(r) for r in args.ranks.split(",")],
                                                              args.all_configs, limit):
        start = time.perf_counter()
        source = ASTSource(fn=fn, signature=signature_of(fn, pointers, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=target, options=options)
        except Exception as error:  # report which variant failed, then fail
            print(f"FAILED {label}: {type(error).__name__}: {error}", flush=True)
            return 1
        shared = compiled.metadata.shared
        status = "ok" if shared <= limit else f"TOO MUCH SHARED MEMORY (limit {limit})"
        print(f"sm_{args.arch} {label:<40} shared={shared:>6} B  {time.perf_counter() - start:5.1f}s  {status}",
              flush=True)
        if status != "ok":
            return 1
        count += 1
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
