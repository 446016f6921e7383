"""python -m bench.cpu_dispatch: the cpu backend's two paths against the torch backend, over a grid of shapes.

The measurement behind ``fused_lora.ops.cpu_ops.fused_path`` (which path of the "cpu"
backend runs a shape) and behind ``backend=None`` choosing "cpu" on CPU
(fused_lora/ops/backends.py): fwd+bwd of ``fused_lora_linear`` with backend="cpu" on its
fused C++ path, backend="cpu" on its ATen path, and backend="torch", on the same
inputs, interleaved repeat by repeat, for T x K -> N, rank r and dropout p over a
grid. With one thread each call is timed by the thread's CPU time (what a busy
shared machine perturbs least); with more, by wall time. One line per case: the
medians, the path the rule picks for the shrink and backward (the forward follows
the rule without dropout), and its time over the torch backend's (the "never
slower" figure) and over the faster path's ("rule loss"); the header
names the CPU model, the ISA path and the thread count. --csv writes the rows.

Run it once per ISA path (FUSED_LORA_ISA=avx2 forces the C++ loops' AVX2 code on
an AVX-512 machine; MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2 do
the same for the base GEMMs and ATen's own kernels).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time

import torch

import fused_lora
from fused_lora.ops import cpu_ops

from .report import cpu_model, isa_path

DEFAULT_TOKENS = "1,16,512,4096"
DEFAULT_SHAPES = "64x64,256x256,2048x2048"
DEFAULT_RANKS = "4,16,64,256"


CONTESTANTS = {"fused": ("cpu", "fused"), "aten": ("cpu", "aten"), "torch": ("torch", "auto")}


def _step(x, weight, bias, lora_A, lora_B, dy, p, contestant):
    backend, cpu_ops.PATH = CONTESTANTS[contestant]
    x.grad = lora_A.grad = lora_B.grad = None
    y = fused_lora.fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, seed=1234, backend=backend)
    y.backward(dy)


def measure(T, K, N, r, p, repeats, dtype=torch.float32):
    """{contestant: [seconds per fwd+bwd]}; interleaved per repeat; a burst of calls at tiny sizes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    lora_A = (torch.randn(r, K, generator=gen) / K ** 0.5).to(adapter_dtype).requires_grad_()
    lora_B = torch.randn(N, r, generator=gen).to(adapter_dtype).requires_grad_()
    dy = torch.randn(T, N, generator=gen).to(dtype)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    work = T * K * N
    calls = max(1, min(200, 2 ** 22 // max(work, 1)))  # NOTE: bursts at tiny sizes, past the clock's resolution
    path = cpu_ops.PATH
    try:
        for contestant in CONTESTANTS:
            _step(x, weight, bias, lora_A, lora_B, dy, p, contestant)
        times = {contestant: [] for contestant in CONTESTANTS}
        for _ in range(repeats):
            for contestant in CONTESTANTS:
                start = clock()
                for _ in range(calls):
                    _step(x, weight, bias, lora_A, lora_B, dy, p, contestant)
                times[contestant].append((clock() - start) / calls)
    finally:
        cpu_ops.PATH = path
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=DEFAULT_TOKENS)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN")
    parser.add_argument("--ranks", default=DEFAULT_RANKS)
    parser.add_argument("--dropout", default="0,0.1")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    grid = itertools.product([int(v) for v in args.tokens.split(",")], shapes,
                             [int(v) for v in args.ranks.split(",")], [float(v) for v in args.dropout.split(",")])
    machine = dict(cpu_model=cpu_model(), isa=isa_path(), threads=torch.get_num_threads(), dtype=args.dtype)
    print(f"{machine['cpu_model']}, ISA path {machine['isa']}, {machine['threads']} thread(s), {args.dtype}, "
          f"fwd+bwd medians of {args.repeats} interleaved repeats")
    print(f"{'T':>5} {'K->N':>11} {'r':>4} {'p':>4} {'fused ms':>9} {'aten ms':>9} {'torch ms':>9} {'rule':>6} "
          f"{'rule/torch':>10} {'rule loss':>9}")
    rows = []
    saved_path, cpu_ops.PATH = cpu_ops.PATH, "auto"
    for T, (K, N), r, p in grid:
        times = measure(T, K, N, r, p, args.repeats, dtype)
        med = {name: statistics.median(values) for name, values in times.items()}
        cpu_ops.PATH = "auto"
        rule = "fused" if cpu_ops.fused_path(T, K, N, r, p) else "aten"
        versus_torch, loss = med[rule] / med["torch"], med[rule] / min(med["fused"], med["aten"])
        rows.append(dict(machine, T=T, K=K, N=N, r=r, p=p, fused_ms=1e3 * med["fused"], aten_ms=1e3 * med["aten"],
                         torch_ms=1e3 * med["torch"], rule=rule, rule_over_torch=versus_torch, rule_loss=loss))
        print(f"{T:>5} {f'{K}->{N}':>11} {r:>4} {p:>4} {1e3 * med['fused']:>9.3f} {1e3 * med['aten']:>9.3f} "
              f"{1e3 * med['torch']:>9.3f} {rule:>6} {versus_torch:>10.2f} {loss:>9.2f}", flush=True)
    cpu_ops.PATH = saved_path
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
