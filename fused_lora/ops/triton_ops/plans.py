"""Plans: everything a launch needs that depends only on the call's signature, built once.

A plan holds the grids, constexprs, chosen strategy and (on a GPU) the compiled kernels
for one call signature (shapes, strides, dtypes, flags, alignment); ``_PlanCache`` keeps
at most ``PLAN_CACHE_SIZE`` of them per operation. ``_ShrinkPlan`` (step 1), ``_ForwardPlan``
(step 2: y) and ``_BackwardPlan`` (steps 3-5: the dy pass, dx, dA) follow DESIGN's kernel plan.
"""

from __future__ import annotations

import threading

import torch
import triton

from ...kernels.common import GemmConfig, interpreting, rank_block
from ...kernels.lora_bwd import (_lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_dx_tma_kernel,
                                 _lora_bwd_dy_kernel, _sum_partials_kernel)
from ...kernels.lora_fwd import _lora_fwd_kernel, _lora_fwd_tma_kernel
from ...kernels.lora_shrink import _lora_shrink_kernel
from . import tuning
from .launch import (TensorDescriptor, _aligned, _columns_fit_int32, _device_facts, _dropout_scalars, _grid_device,
                     _index, _input_precision, _Launch, _lora_precision, _split_float, accumulation_dtype, force_tma)
from .tuning import TMA_MAX_RANK_BLOCK

PLAN_CACHE_SIZE = 1024


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


def clear_plans() -> None:
    """Forget every plan and tuning decision (the next calls rebuild them)."""
    for cache in (_SHRINK_PLANS, _FORWARD_PLANS, _BACKWARD_PLANS):
        cache.clear()
    tuning._TUNED.clear()
    tuning._REPORT.clear()


def plan_count() -> int:
    return len(_SHRINK_PLANS) + len(_FORWARD_PLANS) + len(_BACKWARD_PLANS)



# ----------------------------------------------------------------------------- shrink

class _ShrinkPlan:
    def __init__(self, x2d, lora_A, dropout_p, store_bits):
        self.copy_x = not _columns_fit_int32(x2d)  # read from a contiguous copy (launch._columns_fit_int32)
        if self.copy_x:
            x2d = x2d.contiguous()
        T, K = x2d.shape
        R = lora_A.shape[0]
        size = x2d.element_size()
        lora = _lora_precision(x2d.dtype, lora_A.dtype)
        block_m, block_k, warps, stages = tuning._shrink_config(T, K, R, size, x2d.device, lora["LORA_SPLIT"])
        splits, k_per_split = tuning._shrink_splits(T, K, size, block_m, block_k, x2d.device)
        threshold, scale_hi, scale_lo = _dropout_scalars(dropout_p)
        self.T, self.K, self.R = T, K, R
        self.acc_dtype = accumulation_dtype(x2d.dtype)
        self.store_bits = store_bits
        self.splits = splits
        self.static = (T, K, R, k_per_split, x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1),
                       T * R, R, 1, triton.cdiv(K, 8), threshold, scale_hi, scale_lo)
        self.launch = _Launch(
            _lora_shrink_kernel, (triton.cdiv(T, block_m), splits),
            dict(HAS_DROPOUT=dropout_p > 0.0, STORE_BITS=store_bits, K_ALIGNED=K % 8 == 0,
                 IS_FP64=x2d.dtype == torch.float64, **lora,
                 BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=rank_block(R)),
            dict(num_warps=warps, num_stages=stages), _grid_device(x2d.device))
        if splits > 1:  # the partial sums of the K splits, added in order
            self.sum = _Launch(_sum_partials_kernel, (triton.cdiv(T * R, 1024),),
                               dict(IS_FP64=x2d.dtype == torch.float64, BLOCK=1024), dict(num_warps=4),
                               _grid_device(x2d.device))
            self.sum_static = (splits, T * R, T * R, 1.0, 0.0)

    def __call__(self, x2d, lora_A, seed):
        if self.copy_x:
            x2d = x2d.contiguous()
        xa = torch.empty((self.T, self.R), dtype=self.acc_dtype, device=x2d.device)
        bits = torch.empty((self.T, self.static[11]), dtype=torch.uint8, device=x2d.device) if self.store_bits else None
        parts = xa if self.splits == 1 else torch.empty((self.splits, self.T, self.R), dtype=self.acc_dtype,
                                                        device=x2d.device)
        self.launch(x2d, lora_A, parts, x2d if seed is None else seed, xa if bits is None else bits, *self.static)
        if self.splits > 1:
            self.sum(parts, xa, *self.sum_static)
        return xa, bits



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
    a plan builds one template and only swaps the base tensor per call. The template's
    base is dropped: a plan outlives its call, and must not keep that call's tensors alive.
    """
    template = TensorDescriptor(tensor, list(shape), list(strides), list(block_shape))
    if not hasattr(template, "__dict__"):
        return lambda t: TensorDescriptor(t, list(shape), list(strides), list(block_shape))
    fields = dict(template.__dict__)
    del fields["base"]
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
    """(output descriptor factory, launch, programs) of a persistent TMA GEMM writing a (rows, cols)
    tensor; ``programs`` is the kernel's last runtime argument (num_programs).

    The config's BLOCK_M x BLOCK_N is the output tile; EPILOGUE_SUBTILE stores it in two halves.
    NOTE: the number of programs is a runtime argument (not specialised on): each T with a new
    tile count would otherwise compile the kernel again.
    """
    tiles = triton.cdiv(rows, config.BLOCK_M) * triton.cdiv(cols, config.BLOCK_N)
    programs = _persistent_programs(tiles, device)
    store_cols = config.BLOCK_N // 2 if config.EPILOGUE_SUBTILE else config.BLOCK_N
    out_desc = _descriptor_factory(torch.empty(16, dtype=dtype, device=device), (rows, cols), (cols, 1),
                                   (config.BLOCK_M, store_cols))
    major = _device_facts(_index(device))[1] if device.type == "cuda" else 9
    launch = _Launch(kernel, (programs,),
                     dict(constexprs, EPILOGUE_SUBTILE=config.EPILOGUE_SUBTILE, WARP_SPECIALIZE=config.WARP_SPECIALIZE,
                          FLATTEN=config.flatten(major)),
                     dict(num_warps=config.num_warps, num_stages=config.num_stages), _grid_device(device))
    return out_desc, launch, programs



# ----------------------------------------------------------------------------- forward GEMM

class _ForwardPlan:
    def __init__(self, x2d, weight, bias, lora_B, xa, scaling):
        # x and W read from contiguous copies where their column offsets pass int32 (launch._columns_fit_int32)
        self.copy_x, self.copy_w = not _columns_fit_int32(x2d), not _columns_fit_int32(weight)
        x2d = x2d.contiguous() if self.copy_x else x2d
        weight = weight.contiguous() if self.copy_w else weight
        T, K = x2d.shape
        N, R = lora_B.shape
        self.T, self.N = T, N
        self.device = x2d.device
        self.dtype = x2d.dtype
        self.has_bias = bias is not None
        self.block_r = rank_block(R)
        self.tma_ok = (_tma_possible(x2d.device, x2d.dtype, R) and _tma_rows_ok(x2d) and _tma_rows_ok(weight)
                       and (N * x2d.element_size()) % 16 == 0)
        candidates = tuning._gemm_candidates(x2d.device, x2d.dtype, self.block_r, self.tma_ok, T)
        op_key = ("forward", x2d.device, x2d.dtype, lora_B.dtype, N, K, R, self.has_bias, self.tma_ok,
                  tuning._shape_class(T))

        def run_args():
            return x2d, weight, bias, lora_B, xa, torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)

        self.label, self.strategy = tuning._choose(op_key, candidates, lambda kind, config: self._build(
            kind, config, x2d, weight, lora_B, xa, scaling), run_args, x2d.device)

    def _build(self, kind, config: GemmConfig, x2d, weight, lora_B, xa, scaling):
        T, K = x2d.shape
        N, R = lora_B.shape
        device, dtype = x2d.device, x2d.dtype
        common = dict(HAS_BIAS=self.has_bias, **_lora_precision(dtype, lora_B.dtype, gemm=True),
                      BLOCK_R=self.block_r, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                      BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if kind == "tma":
            x_desc = _descriptor_factory(x2d, (T, K), x2d.stride(), (config.BLOCK_M, config.BLOCK_K))
            w_desc = _descriptor_factory(weight, (N, K), weight.stride(), (config.BLOCK_N, config.BLOCK_K))
            y_desc, launch, programs = _persistent_tma_launch(_lora_fwd_tma_kernel, config, T, N, dtype, device, common)
            static = (T, N, K, R, xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), float(scaling),
                      programs)

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
        if self.copy_x:
            x2d = x2d.contiguous()
        if self.copy_w:
            weight = weight.contiguous()
        y = torch.empty((self.T, self.N), dtype=self.dtype, device=self.device)
        self.strategy(x2d, weight, bias, lora_B, xa, y)
        return y



# ----------------------------------------------------------------------------- backward

class _BackwardPlan:
    def __init__(self, dy, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, from_bits,
                 needs_dx, needs_dA, needs_dB):
        # dy, W and x read from contiguous copies where their column offsets pass int32 (launch._columns_fit_int32)
        self.copy_dy = not _columns_fit_int32(dy)
        self.copy_w = needs_dx and not _columns_fit_int32(weight)
        self.copy_x = needs_dA and x2d is not None and not _columns_fit_int32(x2d)
        dy = dy.contiguous() if self.copy_dy else dy
        weight = weight.contiguous() if self.copy_w else weight
        x2d = x2d.contiguous() if self.copy_x else x2d
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
        dy_lora = _lora_precision(dtype, lora_B.dtype)
        da_lora = _lora_precision(dtype, lora_A.dtype)
        block_r = rank_block(R)
        needs_dxa = needs_dx or needs_dA
        has_dropout = dropout_p > 0.0
        threshold, dscale_hi, dscale_lo = _dropout_scalars(dropout_p)
        scaling_hi, scaling_lo = _split_float(scaling)
        gd = _grid_device(device)

        # Step 3: the dy pass, a grid of column blocks x row splits.
        dy_m, dy_n, dy_warps, dy_stages = tuning._dy_config(T, N, R, dy.element_size(), device,
                                                             dy_lora["LORA_SPLIT"])
        n_splits = triton.cdiv(N, dy_n)
        m_splits = tuning._splits(triton.cdiv(T, dy_m), n_splits, device)
        rows_per_split = triton.cdiv(triton.cdiv(T, dy_m), m_splits) * dy_m
        m_splits = triton.cdiv(T, rows_per_split)
        self.n_splits, self.m_splits = n_splits, m_splits
        self.dy_launch = _Launch(
            _lora_bwd_dy_kernel, (n_splits, m_splits),
            dict(NEEDS_DXA=needs_dxa, NEEDS_DB=needs_dB, IS_FP64=is_fp64, **dy_lora,
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
            mask = tuning._dx_mask(has_dropout, from_bits, K % 8 == 0)
            candidates = tuning._gemm_candidates(device, dtype, block_r, self.tma_ok, T, mask)
            op_key = ("dx", device, dtype, lora_A.dtype, N, K, R, has_dropout, from_bits, self.tma_ok,
                      tuning._shape_class(T))
            dx_args = dict(threshold=threshold, dscale=(dscale_hi, dscale_lo), scaling=(scaling_hi, scaling_lo),
                           has_dropout=has_dropout, from_bits=from_bits, precision=precision, block_r=block_r)
            acc_dtype = self.acc_dtype
            # NOTE: the unused seed pointer is dy, as in __call__, so the trial run compiles what calls use.
            seed_is_read = has_dropout and not from_bits

            def run_args():  # called only where a candidate must run (tuning._choose)
                bits = torch.ones((T, triton.cdiv(K, 8)), dtype=torch.uint8, device=device) if from_bits else None
                seed = torch.zeros((), dtype=torch.int64, device=device) if seed_is_read else dy
                return (dy, weight, torch.zeros((T, R), dtype=acc_dtype, device=device), lora_A, seed, bits,
                        torch.empty((T, K), dtype=dtype, device=device))

            self.dx_args = dx_args
            self.dx_label, self.dx_strategy = tuning._choose(op_key, candidates, lambda kind, config: self._build_dx(
                kind, config, dy, weight, lora_A, dx_args), run_args, device)

        # Step 5: dA = scaling * dxa^T D(x), split over T.
        if needs_dA:
            da_m, da_k, da_warps, da_stages = tuning._da_config(T, K, R, dy.element_size(), device,
                                                                 da_lora["LORA_SPLIT"])
            k_blocks = triton.cdiv(K, da_k)
            row_blocks = triton.cdiv(T, da_m)
            splits = tuning._splits(row_blocks, k_blocks, device)
            rows_per_split = triton.cdiv(row_blocks, splits) * da_m
            self.da_splits = triton.cdiv(T, rows_per_split)
            self.da_launch = _Launch(
                _lora_bwd_da_kernel, (k_blocks, self.da_splits),
                dict(HAS_DROPOUT=has_dropout, MASK_FROM_BITS=from_bits, K_ALIGNED=K % 8 == 0, IS_FP64=is_fp64,
                     **da_lora, BLOCK_M=da_m, BLOCK_K=da_k, BLOCK_R=block_r),
                dict(num_warps=da_warps, num_stages=da_stages), gd)
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
                      **_lora_precision(dtype, lora_A.dtype, gemm=True),
                      BLOCK_R=a["block_r"], BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_K, BLOCK_K=config.BLOCK_N,
                      GROUP_M=config.GROUP_M)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        bits_stride = triton.cdiv(K, 8)
        if kind == "tma":
            dy_desc = _descriptor_factory(dy, (T, N), dy.stride(), (config.BLOCK_M, config.BLOCK_K))
            w_desc = _descriptor_factory(weight, (N, K), weight.stride(), (config.BLOCK_K, config.BLOCK_N))
            dx_desc, launch, programs = _persistent_tma_launch(_lora_bwd_dx_tma_kernel, config, T, K, dtype, device,
                                                               common)
            static = (T, N, K, R, R, 1, lora_A.stride(0), lora_A.stride(1), bits_stride,
                      a["scaling"][0], a["threshold"], a["dscale"][0], programs)

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
        if self.copy_dy:
            dy = dy.contiguous()
        if self.copy_w:
            weight = weight.contiguous()
        if self.copy_x:
            x2d = x2d.contiguous()
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

