"""The Triton kernels compile for a real GPU (sm_90, ahead of time), even on a machine without one,
and no config a launcher can pick spills registers or overflows shared memory.

The interpreter accepts code the real compiler rejects (types, layouts of the mask's
join/reshape, fp64 dots) and knows nothing of registers or shared memory; this runs
``tools/compile_kernels.py --check`` in a subprocess (TRITON_INTERPRET=0): every variant the
heuristics or the tuner can pick (tuning.py's tables), compiled with the JIT's own
specialisation, down to a cubin; registers and spills from ptxas, shared memory from Triton.
The representative set (about 320 variants, ~100 s on 2 cores with a cold Triton cache, seconds
when warm): bf16 at r = 16, 64 and 128 with fp32 adapters (PEFT's default), bf16 at r = 16 and 32
with bf16 adapters, fp16 at r = 16, fp32 at r = 16 and 64, and fp64 (its dots) at r = 16. The whole
table (every dtype, r = 16 and 64, both adapter kinds): ``python tools/compile_kernels.py --check``;
other ranks with ``--ranks 8,16,32,64,128``.
"""

import os
import pathlib
import re
import subprocess
import sys

import triton

from fused_lora.ops.backends import _version

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("bf16:16:fp32,bf16:64:fp32,bf16:128:fp32,bf16:16:x,bf16:32:x,fp16:16:fp32,fp32:16:fp32,fp32:64:fp32,"
         "fp64:16:fp32")
# NOTE: fp64 (gradcheck's dtype, where speed does not matter) is checked for spills with the pinned
# Triton (3.9) only: with 3.6, 3.7 and 3.8 ptxas spills 4-40 bytes of a few fp64 shrink, dA or dx
# variants (3.6 emits a larger fp64 MMA; no block size removed its shrink spills). There fp64 is
# compiled, not checked.
COMPILED_ONLY = "fp64:16:fp32" if _version(triton.__version__) < (3, 9) else None
if COMPILED_ONLY:
    CASES = CASES.replace("," + COMPILED_ONLY, "")


def _compile_kernels(cases: str, check: bool):
    """``tools/compile_kernels.py`` for sm_90 on ``cases`` (``--check``: fail on a spill): (command, result)."""
    # NOTE: the checkout first on the path, so the tool compiles this tree's kernels also where
    # fused_lora is not pip-installed (a source checkout maps kernels/triton itself).
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    command = [sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--arch", "90"] + \
        (["--check"] if check else []) + ["--cases", cases, "--keep-going"]
    return command, subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)


def test_default_kernels_compile_for_sm90_without_spills():
    command, result = _compile_kernels(CASES, check=True)
    problems = [line for line in result.stdout.splitlines() if "FAILED" in line or "SPILLS" in line
                or "SHARED >" in line]
    assert result.returncode == 0, (f"{' '.join(command)} failed:\n" + "\n".join(problems[:40])
                                    + f"\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    summary = result.stdout.splitlines()[-1]
    compiled = re.match(r"compiled (\d+) kernel variants for sm_90 .*; 0 default variants spill", summary)
    assert compiled, summary
    # Every kind of kernel was in the set (a table that silently picked nothing would pass).
    for kernel in ("shrink[", "bwd_dy[", "bwd_da[", "sum_partials", "fwd[", "bwd_dx[", "fwd_tma[", "bwd_dx_tma[",
                   "dropout_mask", "unpack_keep_bits"):
        assert any(kernel in line for line in result.stdout.splitlines()), f"no {kernel} variant compiled"
    if COMPILED_ONLY:
        command, compiled_only = _compile_kernels(COMPILED_ONLY, check=False)
        assert compiled_only.returncode == 0, f"{' '.join(command)} failed:\n{compiled_only.stdout[-2000:]}" \
                                              f"\n{compiled_only.stderr[-4000:]}"
    # r = 64 reaches the TMA kernels now (TMA_MAX_RANK_BLOCK), in every mask mode.
    for mask in ("None", "seed", "bits"):
        assert any(line.split()[1].startswith("bwd_dx_tma[") and "r=64" in line and f"mask={mask}" in line
                   for line in result.stdout.splitlines()[1:-1]), f"no r=64 TMA dx variant with mask={mask}"
