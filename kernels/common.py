"""@triton.jit helpers shared by the LoRA kernels: tile ordering, scalars, dot options.

Also the config helper: under ``TRITON_INTERPRET=1`` autotuning cannot run
(no GPU), so every autotuned kernel gets a single small config there.
"""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """FUSED_LORA_AUTOTUNE=0: no tuning runs, the smallest config that fits (the test suite on a GPU)."""
    return os.environ.get("FUSED_LORA_AUTOTUNE", "1") != "0"


def gemm_configs(gpu_configs, interpreter_config):
    """``gpu_configs`` on a GPU, ``[interpreter_config]`` under the interpreter."""
    return [interpreter_config] if interpreting() else gpu_configs


def lowrank_blocks(rank, element_size):
    """(BLOCK_R, BLOCK) for the kernels whose accumulators are rank-sized (shrink, dy pass, dA).

    BLOCK_R pads the rank to a power of two >= 16 (tl.dot's minimum). BLOCK is
    their row and column tile: 64, or 32 for ranks above 64 and fp64 inputs,
    so that the (BLOCK, BLOCK_R) accumulators stay in registers.
    """
    block_r = max(16, triton.next_power_of_2(rank))
    return block_r, (64 if block_r <= 64 and element_size <= 4 else 32)


def dy_pass_blocks(rank, element_size):
    """(BLOCK_M, BLOCK_N, num_warps) of the dy pass (dxa and the dB partials).

    NOTE: the dB partials are one (N, r) fp32 slab per BLOCK_M rows, so they move
    8 * r / (BLOCK_M * element_size) times the bytes of dy: tall row blocks keep
    that small (r=16: 1/4 at 128 rows, bf16), as far as the (BLOCK_M, r) dxa
    accumulator fits in registers. The interpreter gets 32 rows, so that small
    test shapes still sum several partials.
    """
    if interpreting():
        return 32, 32, 4
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = max(32, min(256, 16384 // block_r) // max(1, element_size // 2))
    return block_m, (64 if element_size <= 2 else 32), (8 if block_m >= 128 else 4)


def fitting_configs(configs, element_size, block_r, limit, tile_dims, reduction_block):
    """Configs whose operand tiles fit ``limit`` bytes of shared memory (at least one is returned).

    Footprint, conservatively: every pipeline stage holds both operand tiles
    (reduction_block x each of tile_dims), plus the rank tiles of the low-rank
    dot (block_r x each of tile_dims), all in the input's element size.
    """

    def footprint(config):
        blocks = config.kwargs
        rows = config.num_stages * blocks[reduction_block] + block_r
        return rows * sum(blocks[d] for d in tile_dims) * element_size

    fitting = [c for c in configs if footprint(c) <= limit]
    return fitting or [min(configs + [SMALLEST_GEMM_CONFIG], key=footprint)]


# NOTE: not in any autotune list (it would be compiled and timed for every shape);
# only for fp64 or fp32 at ranks near 256, where no listed config fits.
SMALLEST_GEMM_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
                                     num_stages=2, num_warps=4)


def shared_memory_pruner(pointer_arg, tile_dims, reduction_block):
    """An ``early_config_prune`` keeping the configs that fit the device's shared memory.

    NOTE: the configs are sized for 2-byte types and small ranks; fp32, fp64 and
    ranks near 256 would otherwise try tiles that cannot fit (seen when
    compiling for sm_90: fp64 at 128x256x64 needs 384 KiB, fp32 at r=256 256 KiB).
    """

    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1 or interpreting():
            return configs
        tensor = named_args[pointer_arg]
        return fitting_configs(configs, tensor.element_size(), kwargs["BLOCK_R"], shared_memory_limit(tensor.device),
                               tile_dims, reduction_block)

    return prune


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on ``device`` (a CUDA device)."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def launch_gemm(kernel, tiles, tensor, block_r, grid, *args, **kwargs):
    """Launch an autotuned GEMM kernel, or, with FUSED_LORA_AUTOTUNE=0 on a GPU, its plain
    jit function with the smallest config that fits.

    NOTE: Triton 3.6 times even a single config left after pruning; bypassing the
    autotuner keeps the suite on a GPU to one quick compile per kernel variant.
    """
    if autotuning() or interpreting():
        kernel[grid](*args, **kwargs)
        return
    config = fitting_configs(kernel.configs, tensor.element_size(), block_r, shared_memory_limit(tensor.device),
                             *tiles)[-1]
    kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M row tiles at a time (L2 reuse)."""
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
