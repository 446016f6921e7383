"""@triton.jit helpers shared by the LoRA kernels: tile ordering, scalars, dot options.

Also the config helper: under ``TRITON_INTERPRET=1`` autotuning cannot run
(no GPU), so every autotuned kernel gets a single small config there.
"""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gemm_configs(gpu_configs, interpreter_config):
    """``gpu_configs`` on a GPU, ``[interpreter_config]`` under the interpreter."""
    return [interpreter_config] if interpreting() else gpu_configs


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
