"""python -m bench --latency: the host path's cost, fwd+bwd wall time per call at tiny T (1 and 16, or --tokens).

At T = 1 and 16 rows a LoRA layer's kernels take microseconds, so the time per call is
what the Python, dispatcher and launch path costs: the figure that decides a real model
with hundreds of LoRA layers and short sequences. Providers are interleaved per repeat;
each repeat runs a burst of calls and synchronises once.
"""

from __future__ import annotations

import csv
import os

import torch

from . import report, timing
from .providers import Weights, build, trainable_parameters
from .report import backend_used

DEFAULT_PROVIDERS = ("linear", "fused_lora", "eager_composite", "peft")


def run(device: torch.device, providers, rows=(1, 16), p=0.1, calls=20, repeats=7):
    """Rows of the latency table: one per (T, provider), microseconds per fwd+bwd call."""
    gpu = device.type == "cuda"
    K = N = 4096 if gpu else 64
    r = 16 if gpu else 4
    dtype = torch.bfloat16 if gpu else torch.float32
    adapter_dtype = torch.float32
    weights = Weights.random(K, N, r, dtype, adapter_dtype, device)
    out = []
    for T in rows:
        x = torch.randn(T, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(T, N, device=device, dtype=dtype)
        contestants, labels = {}, {}
        for name in providers:
            try:
                module, backend = build(name, weights, r, p)
            except NotImplementedError:
                continue
            contestants[name] = (module, trainable_parameters(module))
            labels[name] = backend_used(backend, K, N, T, r, p)
        seconds = timing.time_latency(contestants, x, dy, device, calls=calls, repeats=repeats)
        base = seconds.get("linear")
        for name, values in seconds.items():
            med, p20, p80 = (1e6 * timing.quantile(values, q) for q in timing.QUANTILES)
            ratio = None if base is None else timing.quantile([v / b for v, b in zip(values, base)], 0.5)
            out.append(dict(T=T, K=K, N=N, r=r, p=p, dtype=str(dtype).replace("torch.", ""), provider=name,
                            backend=labels[name], us_per_call=med, p20_us=p20, p80_us=p80, ratio_to_linear=ratio))
    return out


def format_rows(rows) -> str:
    lines = [f"{'latency: fwd+bwd per call':<34} {'provider':<24} {'us/call':>9} {'p20-p80':>15} {'x linear':>9}"]
    for row in rows:
        case = f"T={row['T']} {row['K']}->{row['N']} r={row['r']} p={row['p']} {row['dtype']}"
        name = row["provider"] + (f"[{row['backend']}]" if row["backend"] else "")
        ratio = "-" if row["ratio_to_linear"] is None else f"{row['ratio_to_linear']:.2f}"
        lines.append(f"{case:<34} {name:<24} {row['us_per_call']:>9.1f} {row['p20_us']:>7.1f}-{row['p80_us']:<7.1f} "
                     f"{ratio:>9}")
    return "\n".join(lines)


def main(args, device, providers=None) -> int:
    providers = list(providers or DEFAULT_PROVIDERS)
    if "linear" not in providers:
        providers.insert(0, "linear")
    meta = report.metadata(device)
    rows = run(device, providers, rows=tuple(args.tokens or (1, 16)), repeats=args.repeats or 7)
    isa = f", fused_lora ISA path {meta['isa']}" if device.type == "cpu" else ""
    print(f"latency on {meta['device_name']} ({meta['threads']} threads{isa}), torch {meta['torch']}, "
          f"triton {meta['triton']}, commit {meta['git_commit']}")
    print(format_rows(rows))
    stem = args.name or f"{device.type}-latency"
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{stem}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + report.META_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    print(f"\nwrote {os.path.relpath(path)}")
    return 0
