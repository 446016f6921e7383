"""The Triton kernels compile for a real GPU (sm_90, ahead of time), even on a machine without one.

The interpreter accepts code the real compiler rejects (types, layouts of the
mask's join/reshape, fp64 dots) and knows nothing of shared memory; this runs
the compiler down to a cubin in a subprocess with TRITON_INTERPRET=0.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    # NOTE: the checkout first on the path, so the tool compiles this tree's kernels also where
    # fused_lora is not pip-installed (a source checkout maps kernels/triton itself).
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    command = [sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--arch", "90",
               "--dtypes", "bf16,fp64", "--ranks", "16"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "compiled" in result.stdout.splitlines()[-1]
