"""python -m bench.cpu_pieces: each operation of the CPU backends, timed side by side.

The "cpu" backend (C++ extension) against the "torch" backend (ATen GEMMs and the
Philox mask in torch ops) on the same inputs, piece by piece: the mask, the shrink,
the forward (expand + base GEMM), and the backward whole, dx only, and dA + dB only,
with the bare base GEMMs as the floor. Every contestant runs once per repeat, in
turn, at every thread count asked for (interleaved, so a noisy machine spreads its
noise over everyone); the table gives medians and the cpu / torch ratio.

Run it once per ISA path: FUSED_LORA_ISA=avx2 forces the C++ loops' AVX2 code on an
AVX-512 machine (see csrc/isa.h). Each line names the CPU model, the ISA path and the
thread count it was measured with.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_lora.ops import cpu_ops, torch_ops

from .report import cpu_model, isa_path


def _pieces(T, K, N, r, p, seed=1234, scaling=2.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=gen)
    weight = torch.randn(N, K, generator=gen) / K ** 0.5
    bias = torch.randn(N, generator=gen)
    lora_A = torch.randn(r, K, generator=gen) / K ** 0.5
    lora_B = torch.randn(N, r, generator=gen) / r ** 0.5
    dy = torch.randn(T, N, generator=gen)
    xa = torch_ops.lora_shrink(x, lora_A, seed, p)[0]

    def both(op, *args, **kwargs):
        return {"cpu": lambda: getattr(cpu_ops, op)(*args, **kwargs),
                "torch": lambda: getattr(torch_ops, op)(*args, **kwargs)}

    def backward(needs):
        return both("lora_backward", dy, x, weight, lora_A, lora_B, xa, scaling, seed, p, None, *needs)

    pieces = {}
    if p > 0:
        pieces["mask"] = both("keep_mask", seed, T, K, p, "cpu")
    pieces["shrink"] = both("lora_shrink", x, lora_A, seed, p)
    pieces["forward (expand + GEMM)"] = both("lora_forward", x, weight, bias, lora_B, xa, scaling)
    pieces["backward, all"] = backward((True, True, True))
    pieces["backward, dx only"] = backward((True, False, False))
    pieces["backward, dA + dB only"] = backward((False, True, True))
    floors = {"GEMM x W^T + b": lambda: torch.addmm(bias, x, weight.t()),
              "GEMM dy W": lambda: torch.mm(dy, weight)}
    return pieces, floors


def run(T, K, N, r, dropouts, threads, repeats):
    """{(p, threads, piece, provider): [seconds per repeat]}; providers interleaved per repeat."""
    contestants = []
    for p in dropouts:
        pieces, floors = _pieces(T, K, N, r, p)
        for piece, providers in pieces.items():
            for provider, fn in providers.items():
                contestants.append((p, piece, provider, fn))
        if p == dropouts[0]:
            for piece, fn in floors.items():
                contestants.append((None, piece, "aten", fn))
    before = torch.get_num_threads()
    times = {}
    try:
        for n in threads:  # warm-up: first calls allocate, page in, pick kernels
            torch.set_num_threads(n)
            for _, _, _, fn in contestants:
                fn()
        for _ in range(repeats):
            for n in threads:
                torch.set_num_threads(n)
                for p, piece, provider, fn in contestants:
                    start = time.perf_counter()
                    fn()
                    times.setdefault((p, n, piece, provider), []).append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return times


def format_table(times, threads, dropouts) -> str:
    lines = [f"{'piece':<26} {'p':>4} {'threads':>7} {'cpu ms':>8} {'torch ms':>9} {'cpu/torch':>9}"]
    for n in threads:
        for key in [k for k in times if k[1] == n and k[3] == "aten"]:
            lines.append(f"{key[2]:<26} {'':>4} {n:>7} {1e3 * statistics.median(times[key]):>8.2f}")
        for p in dropouts:
            for piece in dict.fromkeys(k[2] for k in times if k[0] == p and k[1] == n):
                cpu = statistics.median(times[(p, n, piece, "cpu")])
                torch_ = statistics.median(times[(p, n, piece, "torch")])
                lines.append(f"{piece:<26} {p:>4} {n:>7} {1e3 * cpu:>8.2f} {1e3 * torch_:>9.2f} "
                             f"{cpu / torch_:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_pieces", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048x2048", help="KxN")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", default="0,0.1")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    K, N = (int(v) for v in args.shape.split("x"))
    dropouts = [float(v) for v in args.dropout.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    times = run(args.tokens, K, N, args.rank, dropouts, threads, args.repeats)
    print(f"{cpu_model()}, ISA path {isa_path()}, torch {torch.__version__}: T={args.tokens} {K}->{N} "
          f"r={args.rank} fp32, medians of {args.repeats} interleaved repeats")
    print(format_table(times, threads, dropouts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
