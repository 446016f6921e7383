"""Timers: CPU with time.perf_counter (providers interleaved per repeat), CUDA with do_bench."""

from __future__ import annotations

import itertools
import time

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)


def quantile(values, q):
    """Linear-interpolated quantile of a non-empty list."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values):
    """(median, 20th, 80th percentile) of a list of seconds, in milliseconds."""
    return tuple(1e3 * quantile(values, q) for q in QUANTILES)


def _clear_grads(x, params):
    x.grad = None
    for q in params:
        q.grad = None


def cpu_step(module, x, dy, params):
    """One forward and one backward, timed separately: (fwd seconds, bwd seconds)."""
    _clear_grads(x, params)
    start = time.perf_counter()
    y = module(x)
    middle = time.perf_counter()
    y.backward(dy)
    end = time.perf_counter()
    return middle - start, end - middle


def time_cpu_interleaved(contestants, inputs, repeats, warmup=1, min_seconds=0.0):
    """Time every contestant on the same inputs, one iteration each per repeat, in turn.

    contestants: {name: (module, params)}; inputs: list of (x, dy) rotated over
    repeats. Returns {name: {mode: [seconds per repeat]}}. Interleaving spreads
    the machine's noise over everyone instead of penalising whoever ran last.
    """
    times = {name: {mode: [] for mode in MODES} for name in contestants}
    pool = itertools.cycle(inputs)
    for _ in range(warmup):
        x, dy = next(pool)
        for module, params in contestants.values():
            cpu_step(module, x, dy, params)
    started = time.perf_counter()
    done = 0
    while done < repeats or (time.perf_counter() - started < min_seconds and done < 4 * repeats):
        x, dy = next(pool)
        for name, (module, params) in contestants.items():
            fwd, bwd = cpu_step(module, x, dy, params)
            times[name]["fwd"].append(fwd)
            times[name]["bwd"].append(bwd)
            times[name]["fwd+bwd"].append(fwd + bwd)
        done += 1
    return times


def paired_ratios(times, baseline):
    """{name: {mode: (median, p20, p80) of per-repeat ratios to the baseline}}."""
    out = {}
    for name, modes in times.items():
        out[name] = {}
        for mode, values in modes.items():
            ratios = [v / b for v, b in zip(values, times[baseline][mode])]
            out[name][mode] = tuple(quantile(ratios, q) for q in QUANTILES)
    return out


def time_cuda(module, inputs, params):
    """{mode: (median, p20, p80) ms} with triton.testing.do_bench (it flushes L2 between runs)."""
    from triton.testing import do_bench

    pool = itertools.cycle(inputs)
    grads = [x for x, _ in inputs] + list(params)

    def forward():
        x, _ = next(pool)
        return module(x)

    def forward_backward():
        x, dy = next(pool)
        module(x).backward(dy)

    x, dy = inputs[0]
    y = module(x)
    # NOTE: 10 ms warm-up and 50 ms of repeats per figure (do_bench's defaults are 25 and
    # 100): kernels here run 0.05 to 5 ms, and the whole GPU check has 8 minutes.
    options = dict(warmup=10, rep=50, quantiles=list(QUANTILES), grad_to_none=grads)
    results = {
        "fwd": do_bench(forward, **options),
        "bwd": do_bench(lambda: y.backward(dy, retain_graph=True), **options),
        "fwd+bwd": do_bench(forward_backward, **options),
    }
    return {mode: tuple(values) for mode, values in results.items()}


def cuda_peak_bytes(module, x, dy, params):
    """Peak memory allocated above the starting point during one fwd+bwd."""
    _clear_grads(x, params)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    module(x).backward(dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start
