"""Timers: CPU with time.perf_counter, CUDA with events; providers interleaved per repeat."""

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


def time_cuda_interleaved(contestants, inputs, repeats, warmup=3):
    """CUDA events around each contestant's forward and backward, providers interleaved per repeat.

    Returns {name: {mode: [seconds per repeat]}} like ``time_cpu_interleaved``. The events
    time the stream, so a step whose launches outrun the GPU's work measures the GPU, and
    one whose host path is slower than its kernels measures the host: the wall time a
    training loop sees. Inputs rotate over repeats; nothing synchronises inside a repeat.
    """
    times = {name: {mode: [] for mode in MODES} for name in contestants}
    pool = itertools.cycle(inputs)
    for _ in range(warmup):
        x, dy = next(pool)
        for module, params in contestants.values():
            _clear_grads(x, params)
            module(x).backward(dy)
    torch.cuda.synchronize()
    for _ in range(repeats):
        x, dy = next(pool)
        events = {}
        for name, (module, params) in contestants.items():
            _clear_grads(x, params)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            y = module(x)
            marks[1].record()
            y.backward(dy)
            marks[2].record()
            events[name] = marks
        torch.cuda.synchronize()
        for name, (start, middle, end) in events.items():
            fwd, bwd = start.elapsed_time(middle) / 1e3, middle.elapsed_time(end) / 1e3
            times[name]["fwd"].append(fwd)
            times[name]["bwd"].append(bwd)
            times[name]["fwd+bwd"].append(fwd + bwd)
    return times


def time_latency(contestants, x, dy, device, calls=20, repeats=7, warmup=5):
    """Wall time per fwd+bwd call, host included: {name: [seconds per call, one per repeat]}.

    Each repeat runs ``calls`` steps back to back and synchronises once at the end, so at
    tiny T (where the GPU waits for the host) the figure is the host path's cost per call.
    Providers are interleaved per repeat.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(module, params):
        _clear_grads(x, params)
        module(x).backward(dy)

    for module, params in contestants.values():
        for _ in range(warmup):
            step(module, params)
    out = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, (module, params) in contestants.items():
            sync()
            begin = time.perf_counter()
            for _ in range(calls):
                step(module, params)
            sync()
            out[name].append((time.perf_counter() - begin) / calls)
    return out


def cuda_peak_bytes(module, x, dy, params):
    """Peak memory allocated above the starting point during one fwd+bwd."""
    _clear_grads(x, params)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    module(x).backward(dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start
