"""python -m bench.tune: time the triton backend's GEMM candidates once and write the tuning file.

fused_lora's training processes never time kernels: each GEMM takes the choice the tuning
file holds for its shape class, else the heuristic default (fused_lora/ops/triton_ops/
tuning_file.py), so every process and DDP rank runs the same kernels. This command fills
that file for the cases given: for each it runs one fwd+bwd of a FusedLoRALinear on the
triton backend with timing on (``timing_runs``), once per mask mode where p > 0, and
merges the timed choices into the file (``--out``, default ``$FUSED_LORA_TUNING_FILE``,
else ``~/.cache/fused_lora/tuning.json``) under this machine's key (GPU name, torch,
Triton and fused_lora versions). Run it outside training, once per machine kind.

    python -m bench.tune --shapes 4096x4096,4096x14336,14336x4096 --tokens 8192 --ranks 16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli import GPU_SHAPES, _ints, _option, _probabilities, _shapes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _dtypes(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    return names if names and all(n in DTYPES for n in names) else None


def _modes(text):
    from fused_lora.ops.backends import TRITON_MASK_MODES

    modes = [v.strip() for v in text.split(",") if v.strip()]
    return modes if modes and all(m in TRITON_MASK_MODES for m in modes) else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available (cpu: the Triton interpreter, TRITON_INTERPRET=1; plumbing only)")
    parser.add_argument("--shapes", type=_option("comma-separated KxN with K, N >= 1", _shapes),
                        help="in_features x out_features (default: the Llama-3-8B projections)")
    parser.add_argument("--tokens", type=_option("comma-separated ints >= 1", _ints), help="T (default 2048,8192)")
    parser.add_argument("--ranks", type=_option("comma-separated ints >= 1", _ints), help="r (default 16,64)")
    parser.add_argument("--dropout", type=_option("comma-separated probabilities in [0, 1)", _probabilities),
                        help="p (default 0,0.1)")
    parser.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"], help="x and weight dtype")
    parser.add_argument("--adapter-dtypes", default=_dtypes("fp32"),
                        type=_option("comma-separated of fp16, bf16, fp32", _dtypes),
                        help="lora_A / lora_B dtypes (default fp32, PEFT's default)")
    parser.add_argument("--mask-modes", default=None, type=_option("comma-separated of bits, seed", _modes),
                        help="FUSED_LORA_DROPOUT_MASK modes to tune where p > 0 (default both)")
    parser.add_argument("--no-bias", action="store_true", help="layers without a bias")
    parser.add_argument("--out", help="the tuning file to merge into (default: the one fused_lora reads)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from fused_lora.ops import backends
    from fused_lora.ops import triton_ops as ops
    from fused_lora.ops.triton_ops import tuning_file

    from .providers import Weights, _fused_layer

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if not backends._runs_on("triton", device):
        raise SystemExit(f"python -m bench.tune: the triton backend cannot run on {device.type} here "
                         f"(CUDA, or CPU with TRITON_INTERPRET=1)")
    shapes = args.shapes or ([(k, n) for k, n in GPU_SHAPES] if device.type == "cuda" else [(64, 48)])
    tokens = args.tokens or ([2048, 8192] if device.type == "cuda" else [64])
    ranks = args.ranks or ([16, 64] if device.type == "cuda" else [4])
    dropouts = args.dropout or [0.0, 0.1]
    modes = args.mask_modes or list(backends.TRITON_MASK_MODES)
    file = args.out or tuning_file.path()
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    saved_mode = backends.TRITON_MASK_MODE
    ops.clear_plans()
    runs = 0
    try:
        with ops.timing_runs():
            for K, N in shapes:
                for T in tokens:
                    for r in ranks:
                        for adapter in args.adapter_dtypes:
                            weights = Weights.random(K, N, r, dtype, DTYPES[adapter], device)
                            if args.no_bias:
                                weights.bias = None
                            gen = torch.Generator(device=device).manual_seed(1)
                            x = torch.randn(T, K, generator=gen, device=device).to(dtype).requires_grad_(True)
                            dy = torch.randn(T, N, generator=gen, device=device).to(dtype)
                            for p in dropouts:
                                for mode in (modes if p > 0 else modes[:1]):
                                    backends.TRITON_MASK_MODE = mode
                                    layer = _fused_layer(weights, r, p).train()
                                    layer.backend = "triton"
                                    x.grad = None
                                    layer(x).backward(dy)
                                    runs += 1
                                    del layer
                            del x, dy, weights
                            if device.type == "cuda":
                                torch.cuda.synchronize()
    finally:
        backends.TRITON_MASK_MODE = saved_mode
    report = ops.tuning_report()
    timed = {key: dict(choice=v["choice"], timings_ms=v["timings_ms"], failures=v["failures"])
             for key, v in report.items() if v["source"] == "timed"}
    written = tuning_file.write(file, device, timed) if timed else 0
    print(format_report(report))
    print(f"\n{runs} fwd+bwd runs in {time.perf_counter() - started:.1f}s; {written} timed choices merged into {file} "
          f"under '{tuning_file.machine_key(device)}'")
    # Out of memory while timing: that shape class was not tuned (the run says which).
    return 1 if any(v["source"].startswith("default (out of memory") for v in report.values()) else 0


def format_report(report: dict) -> str:
    from fused_lora.ops.triton_ops import tuning_file

    lines = [f"{'GEMM (op dtype adapter N K r flags shape class)':<64} {'choice':<34} timings ms / failures"]
    for key, v in report.items():
        times = ", ".join(f"{label} {ms:.3f}" for label, ms in sorted(v["timings_ms"].items(), key=lambda kv: kv[1]))
        failed = "; ".join(f"{label}: {why}" for label, why in v["failures"].items())
        detail = " | ".join(part for part in (times, failed and "failed " + failed,
                                              "" if v["source"] == "timed" else v["source"]) if part)
        lines.append(f"{tuning_file.entry_key(key):<64} {v['choice']:<34} {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
