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

    def shared_bytes(self, element_size: int, block_r: int) -> int:
        """Shared memory of the operand pipeline plus the rank tiles, conservatively."""
        rows = self.num_stages * self.BLOCK_K + block_r
        return rows * (self.BLOCK_M + self.BLOCK_N) * element_size

    def label(self) -> str:
        extra = ("-sub" if self.EPILOGUE_SUBTILE else "") + ("-ws" if self.WARP_SPECIALIZE else "")
        return (f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}-s{self.num_stages}-w{self.num_warps}"
                f"-g{self.GROUP_M}{extra}")


# NOTE: the first TMA config is tritonbench's bf16 choice on Hopper (128x256x64, 3 stages,
# 8 warps); the 128x128 one has more tiles for shapes that give 128x256 too few waves;
# the 64-row one is for short inputs (a few hundred rows and less).
# NOTE: with dropout the dx epilogue converts a keep tile between register layouts through
# shared memory; 128x256 then fits sm_90 only with subtiled stores and packed keep bits
# (compiled for sm_90: 245 KiB without the subtile, 213 KiB with it; Philox: 278 KiB).
TMA_GEMM_CONFIGS = (
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8, EPILOGUE_SUBTILE=True),
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8, WARP_SPECIALIZE=True),
    GemmConfig(64, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=8, WARP_SPECIALIZE=True),
)
POINTER_GEMM_CONFIGS = (
    GemmConfig(128, 256, 64, num_stages=3, num_warps=8),
    GemmConfig(128, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(64, 128, 64, num_stages=4, num_warps=4),
    GemmConfig(64, 64, 32, num_stages=4, num_warps=4),
    GemmConfig(32, 32, 32, GROUP_M=8, num_stages=2, num_warps=4),
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
