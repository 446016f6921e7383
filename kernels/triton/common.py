"""@triton.jit helpers shared by the LoRA kernels (tile ordering, scalars, accumulators),
and the config helpers: the block shapes each kernel may be launched with.

Which config a call uses is decided by the launcher (``fused_lora/ops/triton_ops/tuning.py``):
a heuristic default, or the fastest of a few candidates timed once per shape.
"""

from dataclasses import dataclass

import triton
import triton.language as tl

from ..env import env_flag


def interpreting() -> bool:
    """TRITON_INTERPRET, a switch parsed as everywhere in the package (``fused_lora.env``)."""
    return env_flag("TRITON_INTERPRET", False) is True


@dataclass(frozen=True)
class GemmConfig:
    """A tile shape of the two big GEMMs (forward y, backward dx).

    BLOCK_M x BLOCK_N is the output tile, BLOCK_K the reduction step (for dx the
    output tile is (rows, in_features) and the reduction runs over out_features:
    the launcher maps the names). EPILOGUE_SUBTILE stores the tile in two halves;
    WARP_SPECIALIZE asks Triton for producer/consumer warps (TMA kernels only).
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_stages: int = 3
    num_warps: int = 8
    EPILOGUE_SUBTILE: bool = False
    WARP_SPECIALIZE: bool = False
    FLATTEN: bool = True

    def shared_bytes(self, element_size: int, block_r: int) -> int:
        """Shared memory of the operand pipeline plus the rank tiles, conservatively."""
        rows = self.num_stages * self.BLOCK_K + block_r
        return rows * (self.BLOCK_M + self.BLOCK_N) * element_size

    def flatten(self, major: int) -> bool:
        """Whether the persistent TMA kernels flatten their tile and K loops on a GPU of compute
        capability ``major``: not with warp specialisation on sm_90 (Triton's persistent-matmul
        tutorial turns it off there; Blackwell handles both)."""
        return self.FLATTEN and not (self.WARP_SPECIALIZE and major == 9)

    def label(self) -> str:
        extra = (("-sub" if self.EPILOGUE_SUBTILE else "") + ("-ws" if self.WARP_SPECIALIZE else "")
                 + ("" if self.FLATTEN else "-nf"))
        return (f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}-s{self.num_stages}-w{self.num_warps}"
                f"-g{self.GROUP_M}{extra}")


# NOTE: the first TMA config is tritonbench's bf16 choice on Hopper (128x256x64, 3 stages,
# 8 warps); the 128x128 ones have more tiles for shapes that give 128x256 too few waves and
# fit every mask mode and r <= 64; the 64-row one is for short inputs (a few hundred rows and
# less). FLATTEN=False ("-nf") keeps the pipeliner from multi-buffering the rank tiles the
# prologue loads (what r = 64 with fp32 adapters needs). Which config each case may use, and
# why, is in fused_lora/ops/triton_ops/tuning.py (TUNED_TMA, TUNED_POINTER); the indices are
# stable (bench/gpu_kernels.py times every config by index).
TMA_GEMM_CONFIGS = (
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8, EPILOGUE_SUBTILE=True),
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8, WARP_SPECIALIZE=True),
    GemmConfig(64, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=8, WARP_SPECIALIZE=True),
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8, EPILOGUE_SUBTILE=True, FLATTEN=False),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=8, FLATTEN=False),
    GemmConfig(128, 128, 64, num_stages=3, num_warps=8, FLATTEN=False),
    GemmConfig(64, 128, 64, num_stages=4, num_warps=4, FLATTEN=False),
)
POINTER_GEMM_CONFIGS = (
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(64, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(64, 64, 32, num_stages=4, num_warps=4),
    GemmConfig(32, 32, 32, GROUP_M=8, num_stages=2, num_warps=4),
    GemmConfig(128, 128, 64, num_stages=3, num_warps=8),
    GemmConfig(128, 128, 32, num_stages=4, num_warps=8),
    GemmConfig(64, 128, 32, num_stages=3, num_warps=4),
    GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
    GemmConfig(32, 64, 32, num_stages=3, num_warps=4),
)
INTERPRETER_GEMM_CONFIG = GemmConfig(32, 32, 32, GROUP_M=4, num_stages=1, num_warps=4)


def fitting_gemm_configs(configs, element_size, block_r, limit):
    """The configs whose shared memory fits ``limit`` bytes, in order (the smallest if none does)."""
    fitting = [c for c in configs if c.shared_bytes(element_size, block_r) <= limit]
    return fitting or [min(configs, key=lambda c: c.shared_bytes(element_size, block_r))]


def rank_block(rank: int) -> int:
    """BLOCK_R: the rank padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile id to (pid_m, pid_n), GROUP_M row tiles at a time (L2 reuse)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _scalar(hi, lo, IS_FP64: tl.constexpr):
    """A Python float passed as two fp32 halves (hi + lo); exact enough for fp64 math.

    NOTE: Triton passes float arguments as fp32; fp64 inputs (gradcheck) need
    the scaling and the dropout scale to ~1e-15, so the launcher splits them.
    """
    if IS_FP64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


@triton.jit
def _zeros_acc(ROWS: tl.constexpr, COLS: tl.constexpr, IS_FP64: tl.constexpr):
    """A zeroed (ROWS, COLS) accumulator: fp32, or fp64 for fp64 inputs."""
    if IS_FP64:
        return tl.zeros((ROWS, COLS), dtype=tl.float64)
    else:
        return tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def _lora_operand(t, dot_dtype, LORA_FP32: tl.constexpr):
    """An operand of a LoRA-branch dot: fp32 when LORA_FP32 (fp32 adapters, or an fp32 input),
    else the input's dtype (16-bit adapters on a 16-bit input, fp64)."""
    if LORA_FP32:
        return t.to(tl.float32)
    else:
        return t.to(dot_dtype)


@triton.jit
def _lora_dot(a, b, acc, dot_dtype, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """acc + a @ b for the LoRA branch: operands as ``_lora_operand`` makes them, the dot at
    LORA_PRECISION ("ieee" / "tf32" as torch's allow_tf32 says for an fp32 input; "tf32" for
    the expands of the GEMMs, whose results are rounded to a 16-bit output; ignored for
    16-bit and fp64 operands)."""
    return tl.dot(_lora_operand(a, dot_dtype, LORA_FP32), _lora_operand(b, dot_dtype, LORA_FP32), acc,
                  input_precision=LORA_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _lora_expand(acc, xa_ptr, b_ptr, offs_m, offs_n, offs_r, mask_m, mask_n, mask_r, stride_xam, stride_xar,
                 stride_bn, stride_br, scaling, dot_dtype, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """acc + (scaling * xa[offs_m]) @ lora_B[offs_n]^T: the low-rank expand a forward GEMM tile
    starts its accumulator from (before the K loop, so no rank tile is live in it)."""
    xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    b_t = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    return _lora_dot(xa * scaling, b_t, acc, dot_dtype, LORA_FP32, LORA_PRECISION)


@triton.jit
def _tf32_pair(t):
    """(hi, lo) with hi + lo == t for fp32 ``t``: hi rounded to tf32 (10 mantissa bits, to
    nearest), so exact in a tf32 dot, and lo the rest (|lo| <= 2^-11 |t|).

    Integer arithmetic on the bits: the interpreter and every GPU agree. Where rounding
    overflows (|t| within 2^-11 of the fp32 maximum) or t is Inf, hi is truncated instead;
    lo is 0 where hi == t, so an Inf stays an Inf (not Inf - Inf = NaN); NaN stays NaN.
    """
    bits = t.to(tl.int32, bitcast=True)
    rounded = (bits + 0x1000) & -8192
    rounded = tl.where((rounded & 0x7F800000) == 0x7F800000, bits & -8192, rounded)
    hi = rounded.to(tl.float32, bitcast=True)
    return hi, tl.where(hi == t, 0.0, t - hi)


@triton.jit
def _lora_dot_exact_a(a, b, acc, dot_dtype, LORA_SPLIT: tl.constexpr, LORA_FP32: tl.constexpr,
                      LORA_PRECISION: tl.constexpr):
    """acc + a @ b where ``a`` holds 16-bit values (x or dy, masked by 0/1 at most) and ``b``
    the LoRA branch's values (lora_A, lora_B, xa).

    LORA_SPLIT (fp32 adapters on a 16-bit input): a 16-bit value is exact in tf32, so two
    tf32 tensor-core dots, a @ hi(b) + a @ lo(b), give fp32's accuracy (each product off by
    at most ~2^-21 of itself, against fp32's 2^-24 and tf32's 2^-11; torch's fp32 matmul
    sums less accurately than that), at 2 dots where Triton's "tf32x3" takes 3 and splits
    ``a`` too. Otherwise ``_lora_dot``.
    """
    if LORA_SPLIT:
        a32 = a.to(tl.float32)
        b_hi, b_lo = _tf32_pair(b.to(tl.float32))
        acc = tl.dot(a32, b_lo, acc, input_precision="tf32", out_dtype=tl.float32)
        return tl.dot(a32, b_hi, acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        return _lora_dot(a, b, acc, dot_dtype, LORA_FP32, LORA_PRECISION)


@triton.jit
def _lora_dot_exact_b(a, b, acc, dot_dtype, LORA_SPLIT: tl.constexpr, LORA_FP32: tl.constexpr,
                      LORA_PRECISION: tl.constexpr):
    """``_lora_dot_exact_a`` with the roles swapped: ``b`` holds 16-bit values, ``a`` is split."""
    if LORA_SPLIT:
        b32 = b.to(tl.float32)
        a_hi, a_lo = _tf32_pair(a.to(tl.float32))
        acc = tl.dot(a_lo, b32, acc, input_precision="tf32", out_dtype=tl.float32)
        return tl.dot(a_hi, b32, acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        return _lora_dot(a, b, acc, dot_dtype, LORA_FP32, LORA_PRECISION)


@triton.jit
def _store_tile(desc, acc, row, col, BLOCK_N: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr):
    """Store an fp32 (rows, BLOCK_N) accumulator through a tensor descriptor in its dtype,
    whole or (EPILOGUE_SUBTILE) as two (rows, BLOCK_N // 2) halves, which halves the
    shared-memory staging buffer of the TMA store."""
    if EPILOGUE_SUBTILE:
        halves = tl.permute(tl.reshape(acc, (acc.shape[0], 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        desc.store([row, col], acc0.to(desc.dtype))
        desc.store([row, col + BLOCK_N // 2], acc1.to(desc.dtype))
    else:
        desc.store([row, col], acc.to(desc.dtype))
