"""python -m bench.gpu_kernels: fused_lora's kernels one by one on a CUDA GPU.

* ``gemm``: each GEMM strategy (every TMA config, the pointer kernel, the cuBLAS
  hybrid) for the forward y and the backward dx, against ``torch.mm`` on the same
  problem (CUDA events, interleaved repeats, medians).
* ``skinny``: the bandwidth-bound kernels (shrink, dy pass, dA, sums) under a few
  block shapes, per-kernel device time from torch.profiler, against one read of the
  tensor each must read.
* ``profile``: one fwd+bwd step at the default settings, every kernel's device time
  (torch.profiler ``key_averages`` sorted by device time), for p = 0 and p = 0.1 in
  both mask modes, beside a frozen nn.Linear. Each skinny pass (shrink, dy pass, dA)
  is set against its read floor: the bytes it must read (x or dy, once) at the read
  bandwidth measured in the same run (``torch.sum`` of the same tensor).

``--configs tuned`` times only the strategies the tuner would (``tuning._gemm_candidates``,
plus the pointer kernel); ``all`` (default) every TMA config at 4096x4096.
``--warm-part i/n`` runs part i of n of the same work once, untimed (strategy by strategy):
several such processes compile the kernel variants in parallel into Triton's cache first.
``--device cpu`` runs the same code in Triton's interpreter on tiny shapes (plumbing only).
Writes <out-dir>/<name>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
TOKENS = 8192
RANK = 16
DEVICE = "cuda"  # main() sets these from the command line
CONFIGS = "all"
SKINNY_VARIANTS = [  # (shrink, dy pass, dA): (BLOCK_M, BLOCK_K or BLOCK_N, warps, stages)
    None,  # the launcher's heuristics
    ((16, 256, 4, 3), (32, 256, 4, 2), (64, 128, 4, 3)),
    ((32, 128, 4, 3), (64, 128, 4, 2), (32, 128, 4, 3)),
    ((64, 128, 8, 3), (128, 256, 8, 2), (128, 128, 8, 3)),
]


def input_dtype(device) -> torch.dtype:
    """bf16 on a GPU; fp16 in the interpreter (which computes bf16 wrongly)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def problem(K, N, T, r, device, seed=0) -> dict:
    """One layer's random tensors on ``device``: x (T, K), dy (T, N), W (N, K), b (N,) in
    ``input_dtype``; A (r, K) and B (N, r) fp32 (PEFT's default adapters on a 16-bit model)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0, dtype=None):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype or input_dtype(device))

    return dict(x=rand(T, K), dy=rand(T, N), W=rand(N, K, scale=K ** -0.5), b=rand(N, scale=0.1),
                A=rand(r, K, scale=K ** -0.5, dtype=torch.float32), B=rand(N, r, scale=r ** -0.5, dtype=torch.float32))


def lora_layer(t, r, p):
    """(FusedLoRALinear on the triton backend in train mode, its frozen nn.Linear) over ``problem``'s W, b,
    A and B; lora_alpha = 2 r."""
    import fused_lora

    N, K = t["W"].shape
    linear = torch.nn.Linear(K, N, device=t["W"].device, dtype=t["W"].dtype)
    with torch.no_grad():
        linear.weight.copy_(t["W"])
        linear.bias.copy_(t["b"])
    layer = fused_lora.FusedLoRALinear.from_linear(linear, r=r, lora_alpha=2 * r, lora_dropout=p)
    layer.lora_A.data = t["A"].clone()
    layer.lora_B.data = t["B"].clone()
    layer.backend = "triton"
    return layer.train(), linear.requires_grad_(False)


def _dtype():
    return input_dtype(DEVICE)


def _sync():
    sync(DEVICE)


def _tensors(K, N, T=None, r=None, seed=0):
    return problem(K, N, T or TOKENS, r or RANK, DEVICE, seed)


def _event_times(fns: dict, repeats=20, warmup=3):
    """{label: median ms}: CUDA events around each call, labels interleaved per repeat
    (perf_counter around each call off a GPU)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    if DEVICE != "cuda":
        samples = {label: [] for label in fns}
        for _ in range(repeats):
            for label, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[label].append(1e3 * (time.perf_counter() - start))
        return {label: statistics.median(v) for label, v in samples.items()}
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        marks = {}
        for label, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            marks[label] = (start, end)
        torch.cuda.synchronize()
        for label, (start, end) in marks.items():
            samples[label].append(start.elapsed_time(end))
    return {label: statistics.median(v) for label, v in samples.items()}


@contextlib.contextmanager
def _plan_without_trial():
    """Build a plan only for its strategy builders: its default GEMM is not tried (as inside a
    graph capture), so a warm process compiles its own share and nothing else."""
    from fused_lora.ops.triton_ops import tuning

    saved = tuning._capturing
    tuning._capturing = lambda device: True
    try:
        yield
    finally:
        tuning._capturing = saved


def _strategies(plan_tma_ok: bool, K, N, mask, configs, device):
    """[(label, kind, config)] to time for one GEMM: the tuner's candidates (``configs="tuned"``)
    or every TMA config (indices ``configs``), the pointer kernel and the hybrid."""
    from fused_lora.kernels.common import POINTER_GEMM_CONFIGS, TMA_GEMM_CONFIGS, rank_block
    from fused_lora.ops.triton_ops import tuning

    if configs == "tuned":
        mask = tuning._dx_mask(mask != "none", mask == "bits", K % 8 == 0)  # as the dx plan names it
        found = tuning._gemm_candidates(device, _dtype(), rank_block(RANK), plan_tma_ok, TOKENS, mask)
        if not any(kind == "pointer" for _, kind, _ in found):  # TMA candidates: add the launcher's pointer kernel
            pointer = tuning._gemm_candidates(device, _dtype(), rank_block(RANK), False, TOKENS, mask)
            found.append(next(c for c in pointer if c[1] == "pointer"))
        return found
    strategies = [(f"tma:{TMA_GEMM_CONFIGS[i].label()}", "tma", TMA_GEMM_CONFIGS[i]) for i in configs]
    return strategies + [(f"pointer:{POINTER_GEMM_CONFIGS[0].label()}", "pointer", POINTER_GEMM_CONFIGS[0]),
                         ("hybrid", "hybrid", POINTER_GEMM_CONFIGS[0])]


def gemm_items(shapes):
    """(name, build) pairs; build() returns {label: fn} (compiles on first call of each fn)."""
    from fused_lora.kernels.common import TMA_GEMM_CONFIGS
    from fused_lora.ops import triton_ops as ops

    device = torch.device(DEVICE)
    items = []
    for K, N in shapes:
        configs = "tuned" if CONFIGS == "tuned" else (
            list(range(len(TMA_GEMM_CONFIGS))) if (K, N) == (4096, 4096) else [0, 1, 2])

        def forward(K=K, N=N, configs=configs):
            t = _tensors(K, N)
            xa = torch.randn(t["x"].shape[0], t["A"].shape[0], device=DEVICE)
            with _plan_without_trial():
                plan = ops._ForwardPlan(t["x"], t["W"], t["b"], t["B"], xa, 2.0)
            y = torch.empty(t["x"].shape[0], N, dtype=_dtype(), device=DEVICE)
            fns = {"torch.mm": lambda: torch.mm(t["x"], t["W"].t()),
                   "F.linear": lambda: torch.nn.functional.linear(t["x"], t["W"], t["b"])}
            for label, kind, config in _strategies(plan.tma_ok, K, N, "none", configs, device):
                strategy = plan._build(kind, config, t["x"], t["W"], t["B"], xa, 2.0)
                fns[label] = lambda s=strategy: s(t["x"], t["W"], t["b"], t["B"], xa, y)
            return fns, t

        items.append((f"fwd {K}->{N}", forward))
        for mode in ("none", "bits", "seed"):
            def backward(K=K, N=N, configs=configs, mode=mode):
                t = _tensors(K, N)
                p = 0.0 if mode == "none" else 0.1
                from_bits = mode == "bits"
                T = t["x"].shape[0]
                xa = torch.randn(T, t["A"].shape[0], device=DEVICE)
                # Any bytes do for timing: the kernel reads every bit whatever it says.
                bits = torch.randint(0, 256, (T, -(-K // 8)), dtype=torch.uint8, device=DEVICE) if from_bits else None
                with _plan_without_trial():
                    plan = ops._BackwardPlan(t["dy"], t["x"], t["W"], t["A"], t["B"], xa, 2.0, p, from_bits,
                                             True, False, False)
                seed = torch.tensor(7, device=DEVICE)
                dxa = torch.randn(t["x"].shape[0], t["A"].shape[0], device=DEVICE)
                dx = torch.empty(t["x"].shape[0], K, dtype=_dtype(), device=DEVICE)
                fns = {"torch.mm": lambda: torch.mm(t["dy"], t["W"])}
                for label, kind, config in _strategies(plan.tma_ok, K, N, mode, configs, device):
                    strategy = plan._build_dx(kind, config, t["dy"], t["W"], t["A"], plan.dx_args)
                    fns[label] = lambda s=strategy: s(t["dy"], t["W"], dxa, t["A"], seed, bits, dx)
                return fns, t

            items.append((f"dx {K}->{N} mask={mode}", backward))
    return items


def run_gemm(items, warm, part=(0, 1)):
    """Rows of the GEMM table; ``warm``: run each strategy of this ``part`` (i, n) once, untimed.

    NOTE: the warm split is by strategy, not by item: one item's strategies are the slow
    compiles, and several processes share them out.
    """
    rows = []
    index, count = part
    position = 0
    for name, build in items:
        fns, _ = build()
        ok = {}
        for label, fn in fns.items():
            position += 1
            if warm and (position - 1) % count != index:
                continue
            try:
                fn()
                _sync()
                ok[label] = fn
            except Exception as error:  # noqa: BLE001 - a config that does not compile or fit
                rows.append(dict(item=name, strategy=label, ms=None, status=f"{type(error).__name__}: {error}"[:200]))
        if warm or not ok:
            continue
        times = _event_times(ok, repeats=20 if DEVICE == "cuda" else 2, warmup=3 if DEVICE == "cuda" else 0)
        base = times.get("torch.mm")
        for label, ms in times.items():
            rows.append(dict(item=name, strategy=label, ms=ms, vs_torch_mm=None if base is None else ms / base,
                             status="ok"))
        del fns, ok
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def _profile_step(module, x, dy, steps=10):
    from torch.profiler import ProfilerActivity, profile

    params = [q for q in module.parameters() if q.requires_grad]

    def step():
        x.grad = None
        for q in params:
            q.grad = None
        module(x).backward(dy)

    for _ in range(3 if DEVICE == "cuda" else 1):
        step()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync()
    events = prof.key_averages()
    rows = []
    for e in events:
        self_device = getattr(e, "self_device_time_total", None)
        if self_device is None:
            self_device = getattr(e, "self_cuda_time_total", 0)
        if self_device > 0 and e.device_type is not None and "CUDA" in str(e.device_type):
            rows.append(dict(kernel=e.key, calls_per_step=e.count / steps, us_per_step=self_device / steps))
    rows.sort(key=lambda r: -r["us_per_step"])
    sort_by = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    return rows, prof.key_averages().table(sort_by=sort_by, row_limit=25)


# The skinny passes and the tensor each must read once: (name fragment, "x" or "dy").
SKINNY_READS = (("shrink", "x"), ("bwd_dy", "dy"), ("bwd_da", "x"))


def _read_floors(t) -> dict:
    """{"x": us, "dy": us}: one read of x and of dy at the read bandwidth measured here
    (``torch.sum`` of the tensor, fp32 accumulation: a read-bound reduction)."""
    times = _event_times({name: lambda v=t[name]: torch.sum(v, dtype=torch.float32) for name in ("x", "dy")},
                         repeats=25 if DEVICE == "cuda" else 2)
    floors = {}
    for name, ms in times.items():
        nbytes = t[name].numel() * t[name].element_size()
        floors[name] = dict(us=1e3 * ms, bytes=nbytes, gb_per_s=nbytes / (ms * 1e-3) / 1e9)
    return floors


def _against_floors(rows, floors) -> None:
    """Adds read_floor_us and x_floor to the rows of the skinny passes (in place)."""
    for row in rows:
        for fragment, tensor in SKINNY_READS:
            if fragment in row["kernel"]:
                row["reads"] = tensor
                row["read_floor_us"] = floors[tensor]["us"]
                row["x_floor"] = row["us_per_step"] / row["calls_per_step"] / floors[tensor]["us"]


def skinny_items():
    items = []
    for index, variant in enumerate(SKINNY_VARIANTS):
        for mode in ("none", "bits", "seed"):
            items.append((f"skinny variant {index} mask={mode}", (variant, mode)))
    return items


def run_skinny(items, warm):
    from fused_lora.ops import backends
    from fused_lora.ops import triton_ops as ops

    rows = []
    K = N = 4096
    t = _tensors(K, N)
    x = t["x"].clone().requires_grad_(True)
    for name, (variant, mode) in items:
        ops.CONFIG_OVERRIDES.clear()
        if variant is not None:
            ops.CONFIG_OVERRIDES.update(shrink=variant[0], dy=variant[1], da=variant[2])
        backends.TRITON_MASK_MODE = "seed" if mode == "seed" else "bits"
        ops.clear_plans()
        layer, _ = lora_layer(t, RANK, 0.0 if mode == "none" else 0.1)
        try:
            if warm:
                layer(x).backward(t["dy"])
                torch.cuda.synchronize()
                continue
            kernels, _ = _profile_step(layer, x, t["dy"], steps=5)
        except Exception as error:  # noqa: BLE001
            rows.append(dict(item=name, variant=str(variant), status=f"{type(error).__name__}: {error}"[:200]))
            continue
        for k in kernels:
            if "lora" in k["kernel"] or "sum_partials" in k["kernel"]:
                rows.append(dict(item=name, variant=str(variant), status="ok", **k))
    ops.CONFIG_OVERRIDES.clear()
    backends.TRITON_MASK_MODE = "bits"
    ops.clear_plans()
    return rows


PROFILE_CASES = (("p=0", 0.0, "bits"), ("p=0.1 bits", 0.1, "bits"), ("p=0.1 seed", 0.1, "seed"))


def run_profiles(warm, part=(0, 1), shape=(4096, 4096)):
    """Default settings, T=8192: per-kernel tables for p=0, p=0.1 (bits, seed), and nn.Linear,
    each skinny pass against its read floor. ``warm``: this ``part`` (i, n) runs its cases once."""
    from fused_lora.ops import backends
    from fused_lora.ops import triton_ops as ops

    out = {}
    K, N = shape
    t = _tensors(K, N)
    x = t["x"].clone().requires_grad_(True)
    index, count = part
    floors = None if warm else _read_floors(t)
    for position, (label, p, mode) in enumerate(PROFILE_CASES):
        if warm and (count - 1 - position) % count != index:
            continue
        backends.TRITON_MASK_MODE = mode
        ops.clear_plans()
        layer, linear = lora_layer(t, RANK, p)
        if warm:
            layer(x).backward(t["dy"])
            _sync()
            continue
        rows, table = _profile_step(layer, x, t["dy"], steps=10 if DEVICE == "cuda" else 1)
        _against_floors(rows, floors)

        def step(module=layer):
            x.grad = None
            module(x).backward(t["dy"])

        # Wall time of the same step, events, against the frozen linear (interleaved).
        times = _event_times({"fused_lora": step, "linear": lambda: step(linear)},
                             repeats=25 if DEVICE == "cuda" else 1, warmup=3 if DEVICE == "cuda" else 0)
        out[label] = dict(kernels=rows, table=table, step_ms=times["fused_lora"], linear_ms=times["linear"],
                          ratio=times["fused_lora"] / times["linear"],
                          choices={" ".join(map(str, k)): v for k, v in ops.tuning_report().items()})
    if not warm:
        rows, table = _profile_step(linear, x, t["dy"], steps=10 if DEVICE == "cuda" else 1)
        out["nn.Linear"] = dict(kernels=rows, table=table)
        out["read floors"] = floors
    backends.TRITON_MASK_MODE = "bits"
    ops.clear_plans()
    return out


def main(argv=None) -> int:
    global DEVICE, TOKENS, RANK, CONFIGS
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gemm,skinny,profile")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    parser.add_argument("--tokens", type=int, default=TOKENS, help="T (default 8192)")
    parser.add_argument("--rank", type=int, default=RANK, help="r (default 16)")
    parser.add_argument("--configs", choices=["all", "tuned"], default="all",
                        help="GEMM strategies: every TMA config (all) or the tuner's candidates and pointer (tuned)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: Triton's interpreter, tiny shapes (plumbing only; TRITON_INTERPRET=1)")
    parser.add_argument("--warm-part", help="i/n: run part i of n once, untimed (fills Triton's cache)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or ".")
    parser.add_argument("--name", default="gpu-kernels")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_kernels needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    DEVICE, TOKENS, RANK, CONFIGS = args.device, args.tokens, args.rank, args.configs
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    parts = args.parts.split(",")
    warm = args.warm_part is not None
    index, count = (int(v) for v in args.warm_part.split("/")) if warm else (0, 1)
    os.environ.setdefault("FUSED_LORA_AUTOTUNE", "0")

    def mine(items):
        return [item for i, item in enumerate(items) if i % count == index]

    started = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    result = {"device": name, "torch": torch.__version__, "tokens": TOKENS, "rank": RANK, "configs": CONFIGS}
    if "gemm" in parts:
        result["gemm"] = run_gemm(gemm_items(shapes), warm, (index, count))
    if "skinny" in parts:
        result["skinny"] = run_skinny(mine(skinny_items()), warm)
    if "profile" in parts:
        result["profile"] = run_profiles(warm, (index, count), shapes[0])
    if warm:
        print(f"warm part {args.warm_part}: {time.perf_counter() - started:.1f}s")
        return 0
    import triton

    result["triton"] = triton.__version__
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = format_result(result)
    with open(os.path.join(args.out_dir, f"{args.name}.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def format_result(result) -> str:
    lines = []
    if result.get("gemm"):
        lines.append(f"{'GEMM':<34} {'strategy':<36} {'ms':>8} {'x torch.mm':>11}")
        for row in result["gemm"]:
            if row["status"] != "ok":
                lines.append(f"{row['item']:<34} {row['strategy']:<36} {row['status'][:60]}")
            else:
                ratio = "-" if row["vs_torch_mm"] is None else f"{row['vs_torch_mm']:.3f}"
                lines.append(f"{row['item']:<34} {row['strategy']:<36} {row['ms']:>8.3f} {ratio:>11}")
    if result.get("skinny"):
        lines.append("")
        lines.append(f"{'skinny kernels (4096->4096, T=8192)':<34} {'kernel':<36} {'us/step':>8} {'calls':>6}")
        for row in result["skinny"]:
            if row["status"] != "ok":
                lines.append(f"{row['item']:<34} {row['status'][:80]}")
            else:
                lines.append(f"{row['item']:<34} {row['kernel'][:36]:<36} {row['us_per_step']:>8.1f} "
                             f"{row['calls_per_step']:>6.1f}")
    profiles = dict(result.get("profile") or {})
    floors = profiles.pop("read floors", None)
    if floors:
        lines.append("")
        lines.append("read floors (torch.sum of the tensor): " + ", ".join(
            f"{name} {v['bytes'] / 2 ** 20:.0f} MiB in {v['us']:.1f} us ({v['gb_per_s']:.0f} GB/s)"
            for name, v in floors.items()))
    for label, prof in profiles.items():
        lines.append("")
        head = f"profile {label}"
        if "ratio" in prof:
            head += f": step {prof['step_ms']:.3f} ms, nn.Linear {prof['linear_ms']:.3f} ms, ratio {prof['ratio']:.3f}"
        lines.append(head)
        for row in prof["kernels"][:14]:
            floor = f"  {row['x_floor']:.2f}x its read floor ({row['reads']})" if "x_floor" in row else ""
            lines.append(f"  {row['kernel'][:70]:<70} {row['us_per_step']:>8.1f} us {row['calls_per_step']:>5.1f}x"
                         f"{floor}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
