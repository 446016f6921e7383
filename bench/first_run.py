"""python -m bench.first_run STEP: the steps of ``GPU_CHECK_STAGE=first`` (bench/gpu_check.sh)
that no other benchmark covers. Each writes its files into ``--out-dir`` as it goes, so a
step killed at its time cap still leaves what it measured.

* ``correctness`` (1-correctness.{json,txt}): fwd+bwd of ``fused_lora_linear`` on the triton
  backend against an fp64 reference (the same bf16 x, W, b and fp32 adapters, the mask from
  ``keep_mask_torch``): p = 0 and 0.1, the 0.1 in both mask modes (FUSED_LORA_DROPOUT_MASK
  bits and seed), untuned (heuristic defaults), then tuned (``--tune FILE``: ``python -m
  bench.tune`` writes FILE between the two, 1-tune.txt). Per output (y, dx, dA, dB): max|error| /
  max|reference|, beside the torch backend's on the same inputs. Also the masks, bit for bit
  against ``keep_mask_torch``: the shrink's packed bits (bits mode), Triton's mask kernel
  (seed mode; the kernels regenerate the same Philox stream in place). Exit 1 when an output is not finite, more
  than 5% off (a wrong mask or tile moves it by far more than rounding) or a mask differs.
* ``registers`` (2-registers.{csv,txt}): runs every GEMM candidate once
  (``FUSED_LORA_AUTOTUNE=compile``) on the correctness cases, and the defaults at T=16 (the
  latency row), then reads each
  loaded kernel's registers and spill bytes (``n_regs``, ``n_spills`` of Triton's
  CompiledKernel), its shared memory and constexprs, from Triton's in-memory caches.
* ``memory`` (5-memory.{csv,txt}): ``torch.cuda.memory_allocated`` after fwd+bwd steps at
  five T (and the first again): flat when no cache keeps a step's tensors; each step's peak
  beside a frozen nn.Linear's. Also a weakref per step's x: dead after ``del``.

``--device cpu`` runs the same code in Triton's interpreter (TRITON_INTERPRET=1) on tiny
shapes in fp16: the GPU check's dry run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import os
import sys
import time
import weakref

import torch

from .gpu_kernels import input_dtype, lora_layer, problem, sync

FAIL_RELATIVE = 0.05  # an output this far off (relative to its largest value) is wrong, not rounded


class _Writer:
    """<out-dir>/<stem>.json rewritten and <stem>.txt appended after every row."""

    def __init__(self, out_dir: str, stem: str, meta: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.json_path = os.path.join(out_dir, f"{stem}.json")
        self.txt_path = os.path.join(out_dir, f"{stem}.txt")
        self.data = dict(meta, rows=[])
        with open(self.txt_path, "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in meta.items()) + "\n")
        self._dump()

    def _dump(self):
        with open(self.json_path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def row(self, row: dict, line: str):
        self.data["rows"].append(row)
        self._dump()
        with open(self.txt_path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def note(self, key, value, line: str | None = None):
        self.data[key] = value
        self._dump()
        if line:
            with open(self.txt_path, "a") as f:
                f.write(line + "\n")
            print(line, flush=True)


def _meta(device) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__}


# ----------------------------------------------------------------------------- correctness

SCALING, SEED = 2.0, 2 ** 40 + 123


def _fwd_bwd(t, p, backend):
    from fused_lora import fused_lora_linear

    x = t["x"].detach().requires_grad_(True)
    A = t["A"].detach().requires_grad_(True)
    B = t["B"].detach().requires_grad_(True)
    y = fused_lora_linear(x, t["W"], t["b"], A, B, SCALING, p, seed=SEED, backend=backend)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), t["dy"])
    return {"y": y.detach(), "dx": dx, "dA": dA, "dB": dB}


def _reference(t, p, keep):
    from fused_lora import lora_linear_reference

    x = t["x"].double().requires_grad_(True)
    A = t["A"].double().requires_grad_(True)
    B = t["B"].double().requires_grad_(True)
    y = lora_linear_reference(x, t["W"].double(), t["b"].double(), A, B, SCALING, keep, p)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), t["dy"].double())
    return {"y": y.detach(), "dx": dx, "dA": dA, "dB": dB}


def _errors(got, ref) -> dict:
    out = {}
    for name, value in got.items():
        value = value.double()
        if not torch.isfinite(value).all():
            out[name] = float("inf")
            continue
        out[name] = ((value - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-300)).item()
    return out


def _tune(args, device, writer) -> None:
    """python -m bench.tune into ``args.tune`` (its output in 1-tune.txt); later calls read that file."""
    from . import tune

    started = time.perf_counter()
    tune_argv = ["--device", device.type, "--shapes", ",".join(f"{k}x{n}" for k, n in args.tune_shapes),
                 "--tokens", str(args.tokens), "--ranks", str(args.rank), "--dropout", "0,0.1", "--dtype",
                 "bf16" if device.type == "cuda" else "fp16", "--adapter-dtypes", "fp32", "--out", args.tune]
    stdout = sys.stdout
    with open(os.path.join(args.out_dir, "1-tune.txt"), "w") as log:
        sys.stdout = log
        try:
            status = tune.main(tune_argv)
        finally:
            sys.stdout = stdout
    os.environ["FUSED_LORA_TUNING_FILE"] = os.path.abspath(args.tune)
    writer.note("tune", dict(argv=tune_argv, exit=status, seconds=time.perf_counter() - started),
                f"python -m bench.tune {' '.join(tune_argv)}: exit {status} in "
                f"{time.perf_counter() - started:.1f}s (1-tune.txt)")


def correctness(args, device) -> int:
    from fused_lora.ops import backends
    from fused_lora.ops import triton_ops as ops
    from fused_lora.philox import keep_mask_torch

    K, N = args.shape
    T, r = args.tokens, args.rank
    writer = _Writer(args.out_dir, "1-correctness", dict(_meta(device), K=K, N=N, T=T, r=r,
                                                         dtype=str(input_dtype(device)), adapters="torch.float32",
                                                         scaling=SCALING))
    t = problem(K, N, T, r, device)
    failed = 0
    header = (f"{'case':<26} {'outputs: max|error| / max|fp64| (torch backend)':<88} verdict")
    print(header)
    with open(writer.txt_path, "a") as f:
        f.write(header + "\n")
    references, torch_errors, masks = {}, {}, {}
    saved_mode, saved_autotune = backends.TRITON_MASK_MODE, os.environ.get("FUSED_LORA_AUTOTUNE")
    try:
        for tuned in ([False, True] if args.tune else [False]):
            if tuned:  # after the untuned rows: a tuning run cut short by the cap still leaves them
                _tune(args, device, writer)
            os.environ["FUSED_LORA_AUTOTUNE"] = "1" if tuned else "0"
            for p, mode in ((0.0, "bits"), (0.1, "bits"), (0.1, "seed")):
                backends.TRITON_MASK_MODE = mode
                ops.clear_plans()
                if p not in references:
                    masks[p] = keep_mask_torch(SEED, T, K, p, device) if p else None
                    references[p] = _reference(t, p, masks[p])
                    torch_errors[p] = _errors(_fwd_bwd(t, p, "torch"), references[p])
                started = time.perf_counter()
                errors = _errors(_fwd_bwd(t, p, "triton"), references[p])
                sync(device)
                seconds = time.perf_counter() - started
                mask_ok = True
                if p:  # bits mode: the shrink's packed bits; seed mode: Triton's mask kernel (dropout_mask)
                    if mode == "bits":
                        _, bits = ops.lora_shrink(t["x"], t["A"], SEED, p)
                        used = ops.unpack_keep_bits(bits, K)
                    else:
                        used = ops.keep_mask(SEED, T, K, p, device)
                    mask_ok = torch.equal(used, masks[p])
                bad = [n for n, e in errors.items() if not e <= FAIL_RELATIVE]
                worse = [n for n, e in errors.items() if e > 2 * torch_errors[p][n]]
                verdict = ("FAIL " + ",".join(bad) if bad else "") + ("" if mask_ok else " MASK DIFFERS")
                verdict = verdict.strip() or ("ok" if not worse else "ok, over 2x the torch backend's: " + ",".join(worse))
                failed += bool(bad) or not mask_ok
                case = f"{'tuned' if tuned else 'untuned'} p={p} {mode if p else '-'}"
                cells = "  ".join(f"{n} {e:.1e} ({torch_errors[p][n]:.1e})" for n, e in errors.items())
                choices = {" ".join(str(part) for part in key): [v["choice"], v["source"]]
                           for key, v in ops.tuning_report().items()}
                writer.row(dict(case=case, tuned=tuned, p=p, mask_mode=mode if p else None, errors=errors,
                                torch_backend_errors=torch_errors[p], mask_equal=mask_ok, verdict=verdict,
                                seconds=seconds, choices=choices), f"{case:<26} {cells:<88} {verdict}")
    finally:
        backends.TRITON_MASK_MODE = saved_mode
        if saved_autotune is None:
            os.environ.pop("FUSED_LORA_AUTOTUNE", None)
        else:
            os.environ["FUSED_LORA_AUTOTUNE"] = saved_autotune
    return 1 if failed else 0


# ----------------------------------------------------------------------------- registers

KERNEL_MODULES = ("lora_fwd", "lora_bwd", "lora_shrink", "dropout_mask")


def loaded_kernels():
    """(kernel name, CompiledKernel, JITFunction) for every variant Triton compiled or loaded in
    this process, from each @triton.jit function's per-device cache (Triton 3.x layout)."""
    from triton.runtime.jit import JITFunction

    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"fused_lora.kernels.{module_name}")
        for name, fn in sorted(vars(module).items()):
            if not isinstance(fn, JITFunction):
                continue
            caches = getattr(fn, "device_caches", None) or {}
            for cache in list(caches.values()):
                kernel_cache = cache[0] if isinstance(cache, tuple) else cache
                for kernel in list(getattr(kernel_cache, "values", lambda: [])()):
                    if hasattr(kernel, "result"):  # async compile mode: a future
                        kernel = kernel.result()
                    yield name, kernel, fn


def _kernel_row(name, kernel, fn) -> dict:
    metadata = getattr(kernel, "metadata", None)
    src = getattr(kernel, "src", None)
    constants = {}
    for key, value in (getattr(src, "constants", None) or {}).items():
        index = key[0] if isinstance(key, tuple) else key
        arg = fn.arg_names[index] if isinstance(index, int) and index < len(fn.arg_names) else str(key)
        if arg.isupper() or arg.startswith(("BLOCK", "NUM", "HAS", "IS", "K_", "MASK", "STORE", "EPILOGUE", "WARP")):
            constants[arg] = value
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        try:
            kernel._init_handles()
        except Exception:  # noqa: BLE001 - reported as unknown below
            pass
    return dict(kernel=name, constexprs=" ".join(f"{k}={v}" for k, v in sorted(constants.items())),
                num_warps=getattr(metadata, "num_warps", None), num_stages=getattr(metadata, "num_stages", None),
                shared_bytes=getattr(metadata, "shared", None), n_regs=getattr(kernel, "n_regs", None),
                n_spills=getattr(kernel, "n_spills", None))


def registers(args, device) -> int:
    from fused_lora.ops import backends

    K, N = args.shape
    t = problem(K, N, args.tokens, args.rank, device)
    started = time.perf_counter()
    runs = []
    for T in (args.tokens, 16):
        # At T: every candidate runs once, none is timed; at 16 (the latency row), the defaults only.
        os.environ["FUSED_LORA_AUTOTUNE"] = "compile" if T == args.tokens else "0"
        for p, mode in ((0.0, "bits"), (0.1, "bits"), (0.1, "seed")):
            backends.TRITON_MASK_MODE = mode
            layer, _ = lora_layer(t, args.rank, p)
            x = t["x"][:T].detach().requires_grad_(True)
            try:
                layer(x).backward(t["dy"][:T])
                sync(device)
                runs.append(f"T={T} p={p} {mode}: ok")
            except Exception as error:  # noqa: BLE001 - the table says which case failed
                runs.append(f"T={T} p={p} {mode}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    backends.TRITON_MASK_MODE = "bits"
    rows = [_kernel_row(name, kernel, fn) for name, kernel, fn in loaded_kernels()]
    os.makedirs(args.out_dir, exist_ok=True)
    columns = ["kernel", "constexprs", "num_warps", "num_stages", "shared_bytes", "n_regs", "n_spills"]
    with open(os.path.join(args.out_dir, "2-registers.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    spilling = [r for r in rows if r["n_spills"]]
    lines = [" ".join(f"{k}={v}" for k, v in _meta(device).items()) + f", {time.perf_counter() - started:.1f}s",
             *runs, "",
             f"{'kernel':<28} {'regs':>5} {'spill B':>8} {'smem KiB':>9} {'warps':>5} {'stages':>6}  constexprs"]
    for r in rows:
        smem = "?" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f}"
        lines.append(f"{r['kernel']:<28} {str(r['n_regs']):>5} {str(r['n_spills']):>8} {smem:>9} "
                     f"{str(r['num_warps']):>5} {str(r['num_stages']):>6}  {r['constexprs']}")
    lines.append(f"\n{len(rows)} kernel variants loaded, {len(spilling)} spill registers"
                 + ("" if rows else " (none compiled: Triton's interpreter runs them)"))
    text = "\n".join(lines)
    with open(os.path.join(args.out_dir, "2-registers.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if all(run.endswith(": ok") for run in runs) else 1


# ----------------------------------------------------------------------------- memory

def memory(args, device) -> int:
    from fused_lora.ops import triton_ops as ops

    K, N = args.shape
    r, p = args.rank, 0.1
    cuda = device.type == "cuda"
    tokens = list(args.memory_tokens) + [args.memory_tokens[0]]
    t = problem(K, N, max(tokens), r, device)
    layer, linear = lora_layer(t, r, p)
    del t

    def step(module, T):
        gen = torch.Generator(device=device).manual_seed(T)
        x = torch.randn(T, K, generator=gen, device=device).to(input_dtype(device)).requires_grad_(True)
        dy = torch.randn(T, N, generator=gen, device=device).to(input_dtype(device))
        for q in module.parameters():
            q.grad = None
        sync(device)
        before = torch.cuda.memory_allocated() if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        module(x).backward(dy)
        sync(device)
        peak = torch.cuda.max_memory_allocated() - before if cuda else None
        held = weakref.ref(x)
        del x, dy
        for q in module.parameters():
            q.grad = None
        gc.collect()
        sync(device)
        return peak, held() is not None

    step(layer, tokens[0])  # first use: compiles, allocates the library workspaces
    writer = _Writer(args.out_dir, "5-memory", dict(_meta(device), K=K, N=N, r=r, p=p, dtype=str(input_dtype(device))))
    head = f"{'T':>6} {'allocated after (MiB)':>22} {'peak (MiB)':>11} {'nn.Linear peak':>15} {'ratio':>6} x alive plans"
    print(head)
    with open(writer.txt_path, "a") as f:
        f.write(head + "\n")
    after = []
    for T in tokens:
        peak, alive = step(layer, T)
        linear_peak, _ = step(linear, T)
        allocated = torch.cuda.memory_allocated() if cuda else None
        after.append(allocated)
        ratio = peak / linear_peak if cuda and linear_peak else None

        def mib(v):
            return "n/a" if v is None else f"{v / 2 ** 20:.1f}"

        writer.row(dict(T=T, allocated_after=allocated, peak=peak, linear_peak=linear_peak, peak_ratio=ratio,
                        x_alive_after_del=alive, plans=ops.plan_count()),
                   f"{T:>6} {mib(allocated):>22} {mib(peak):>11} {mib(linear_peak):>15} "
                   f"{'n/a' if ratio is None else f'{ratio:.3f}':>6} {str(alive):>7} {ops.plan_count():>5}")
    spread = None if not cuda else max(after) - min(after)
    flat = (spread is None or spread <= 2 ** 20)
    any_alive = any(row["x_alive_after_del"] for row in writer.data["rows"])
    writer.note("flat", dict(spread_bytes=spread, flat=flat, x_alive=any_alive),
                f"allocated after each step: spread {'n/a (cpu)' if spread is None else f'{spread} bytes'}: "
                f"{'flat' if flat else 'NOT FLAT'}; x of a step alive after del: {any_alive}")
    return 0 if flat and not any_alive else 1


# ----------------------------------------------------------------------------- command line

def _shape(text):
    k, n = (int(v) for v in text.split("x"))
    return k, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["correctness", "registers", "memory"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--shape", type=_shape, help="KxN (default 4096x4096; cpu 64x48)")
    parser.add_argument("--tokens", type=int, help="T (default 8192; cpu 64)")
    parser.add_argument("--rank", type=int, help="r (default 16; cpu 4)")
    parser.add_argument("--tune", help="correctness: write this tuning file with python -m bench.tune first, "
                                       "then check untuned and tuned")
    parser.add_argument("--tune-shapes", type=lambda s: [_shape(v) for v in s.split(",")],
                        help="the shapes bench.tune tunes (default 4096x4096,4096x14336,14336x4096; cpu --shape)")
    parser.add_argument("--memory-tokens", type=lambda s: [int(v) for v in s.split(",")],
                        help="memory: the T of the steps (default 4096,5120,6144,7168,8192; cpu 32,48,64,80,96)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or ".")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.shape = args.shape or ((4096, 4096) if gpu else (64, 48))
    args.tokens = args.tokens or (8192 if gpu else 64)
    args.rank = args.rank or (16 if gpu else 4)
    args.tune_shapes = args.tune_shapes or ([(4096, 4096), (4096, 14336), (14336, 4096)] if gpu else [args.shape])
    args.memory_tokens = args.memory_tokens or ([4096, 5120, 6144, 7168, 8192] if gpu else [32, 48, 64, 80, 96])
    started = time.perf_counter()
    status = {"correctness": correctness, "registers": registers, "memory": memory}[args.step](args, device)
    print(f"bench.first_run {args.step}: exit {status} after {time.perf_counter() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
