"""python -m bench.warm --parts N [sweep arguments]: compile fused_lora's kernels in parallel.

A fresh GPU machine has an empty Triton cache, and each kernel variant takes 1-10 s
to compile. This starts N processes that run the kernel benchmark's work once,
untimed (``bench.gpu_kernels --warm-part i/N``), and N that run fused_lora once on
their share of the sweep's cases with ``FUSED_LORA_AUTOTUNE=compile`` (every
candidate the tuner would time is compiled, none is timed). The later, timed runs
then find the kernels in Triton's on-disk cache.

``--kernel-args "..."`` and ``--latency-args "..."`` pass options on to the kernel
benchmark's and the latency row's processes; ``--no-sweep`` leaves out the sweep's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--no-kernels", action="store_true", help="skip bench.gpu_kernels' variants")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep's cases")
    parser.add_argument("--kernel-args", default="", help="options for each bench.gpu_kernels --warm-part process")
    parser.add_argument("--latency", action="store_true", help="also run the latency row once (tiny T variants)")
    parser.add_argument("--latency-args", default="", help="options for the latency row's process")
    args, sweep_args = parser.parse_known_args(argv)
    started = time.perf_counter()
    processes = []
    for i in range(args.parts):
        part = f"{i}/{args.parts}"
        if not args.no_kernels:
            processes.append((f"kernels {part}", subprocess.Popen(
                [sys.executable, "-m", "bench.gpu_kernels", "--warm-part", part, *shlex.split(args.kernel_args)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        if args.no_sweep:
            continue
        processes.append((f"sweep {part}", subprocess.Popen(
            [sys.executable, "-m", "bench", "--warm-part", part, *sweep_args],
            env=dict(os.environ, FUSED_LORA_AUTOTUNE="compile"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    if args.latency:
        import tempfile

        processes.append(("latency", subprocess.Popen(
            [sys.executable, "-m", "bench", "--latency", "--repeats", "1", "--out-dir", tempfile.mkdtemp(),
             *shlex.split(args.latency_args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = 0
    for label, process in processes:
        output, _ = process.communicate()
        tail = "\n".join(output.strip().splitlines()[-3:])
        print(f"[{label}] exit {process.returncode}: {tail}")
        failed += process.returncode != 0
    print(f"warmed in {time.perf_counter() - started:.1f}s, {failed} of {len(processes)} processes failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
