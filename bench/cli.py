"""python -m bench: LoRA linear fwd / bwd / fwd+bwd against PEFT, torch.compile and the frozen-linear limit.

Every row is timed in the same run as a frozen nn.Linear on the same inputs,
so every figure is also a ratio to the limit. Prints a table and writes
<device>-<date>[-quick].{csv,json,png} (and -e2e.csv) to bench/results/scratch/
(not tracked by git), or to bench/results/ with --publish, or to --out-dir / $OUT.
Shapes are in_features x out_features (KxN), as in the calculator.

``--base nf4``: the same over a 4-bit base (bitsandbytes NF4, QLoRA): fused_lora and PEFT over
the same ``Linear4bit``, the frozen dense nn.Linear still the limit, a memory table (the frozen
weights' bytes, saved / peak), and an end-to-end row for a 4-bit Llama (PEFT over bitsandbytes,
then ``from_peft``). Needs bitsandbytes (``pip install .[qlora]``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import torch

from . import e2e, latency, report
from .providers import ALL_PROVIDERS, NF4_PROVIDERS, PROVIDERS
from .sweep import Case, run_case

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCRATCH_DIR = os.path.join(RESULTS_DIR, "scratch")  # in .gitignore
NOISE_LIMIT = 0.10  # warn when a row's p20-p80 spread exceeds this fraction of its median

# (K, N, T) defaults. CPU: scaled down to finish within 5 minutes on 2 cores.
CPU_CASES = [(1024, 1024, 1024), (1024, 1024, 4096), (2048, 2048, 1024), (2048, 2048, 4096), (2048, 5632, 1024)]
CPU_QUICK_CASES = [(1024, 1024, 1024)]
GPU_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # Llama-3-8B projections
GPU_TOKENS = [2048, 8192, 16384]
# --base nf4: issue 19's shapes. CPU: 2048x2048 at T 16, 1024, 4096 (fp32, r=16, p=0.1);
# GPU: 4096x4096 and 4096x14336 at T 16, 512, 8192 (bf16, r=16).
NF4_CPU_CASES = [(2048, 2048, 16), (2048, 2048, 1024), (2048, 2048, 4096)]
NF4_CPU_QUICK_CASES = [(256, 256, 16)]
NF4_GPU_SHAPES = [(4096, 4096), (4096, 14336)]
NF4_GPU_TOKENS = [16, 512, 8192]


def _option(expected, parse):
    """An argparse type: ``parse(text)``, or a usage error (exit 2) naming the option and ``expected``
    for a value the sweep cannot run, instead of a traceback later."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return convert


def _ints(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    return values if values and min(values) >= 1 else None


def _shapes(text):
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]
    return shapes if all(len(s) == 2 and min(s) >= 1 for s in shapes) else None


def _probabilities(text):
    values = [float(v) for v in text.split(",") if v.strip()]
    return values if values and all(0.0 <= p < 1.0 for p in values) else None


def _positive_int(text):
    value = int(text)
    return value if value >= 1 else None


def _part(text):
    index, count = (int(v) for v in text.split("/"))
    return (index, count) if 0 <= index < count else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--shapes", type=_option("comma-separated KxN with K, N >= 1 (e.g. 4096x4096)", _shapes),
                        help="comma-separated KxN (in_features x out_features), e.g. 4096x4096,4096x14336")
    ints = _option("comma-separated ints >= 1", _ints)
    parser.add_argument("--tokens", type=ints, help="comma-separated T (rows of x)")
    parser.add_argument("--ranks", type=ints, help="comma-separated r (default: 16 on CPU, 16,64 on GPU)")
    parser.add_argument("--dropout", type=_option("comma-separated probabilities in [0, 1)", _probabilities),
                        help="comma-separated p (default 0,0.1)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp32 on CPU, bf16 on GPU")
    parser.add_argument("--base", choices=["dense", "nf4"], default="dense",
                        help="the frozen base: dense (default) or nf4 (bitsandbytes 4-bit, QLoRA; providers "
                             f"{NF4_PROVIDERS}; needs bitsandbytes)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {ALL_PROVIDERS} (default: {PROVIDERS}, or {NF4_PROVIDERS} "
                             f"with --base nf4)")
    positive = _option("an int >= 1", _positive_int)
    parser.add_argument("--repeats", type=positive, help="timed repeats per case (default 5 on CPU, 25 on GPU)")
    parser.add_argument("--threads", type=positive, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one small case, 3 repeats, a tiny end-to-end model")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Llama row")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end Llama row")
    parser.add_argument("--latency", action="store_true",
                        help="only the latency row: fwd+bwd wall time per call at T=1 and 16, or --tokens "
                             "(K=N=4096 on GPU, 64 on CPU)")
    parser.add_argument("--warm-part", type=_option("i/n with 0 <= i < n (e.g. 0/4)", _part),
                        help="i/n: run fused_lora once on part i of n of the cases, untimed, "
                                            "to fill Triton's cache from several processes first")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--publish", action="store_true",
                        help=f"write to {os.path.relpath(RESULTS_DIR)}/ (tracked by git) instead of "
                             f"{os.path.relpath(SCRATCH_DIR)}/")
    parser.add_argument("--out-dir", help=f"output folder (default: $OUT if set, else {os.path.relpath(SCRATCH_DIR)}/, "
                                          f"or {os.path.relpath(RESULTS_DIR)}/ with --publish)")
    parser.add_argument("--name", help="file stem (default <device>-<date>, with -quick for --quick)")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.out_dir is None:
        args.out_dir = RESULTS_DIR if args.publish else (os.environ.get("OUT") or SCRATCH_DIR)
    elif args.publish:
        parser.error("--publish: writes to bench/results/; leave out --out-dir")
    return args


def _check_args(parser, args) -> None:
    """parser.error (exit 2, with the usage) for a --device or --name the run cannot use; the lists
    and numbers are checked as argparse parses them (``_option``)."""
    try:
        device = torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected auto, cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda is not available here (use auto or cpu)")
    if args.name is not None and (not args.name or os.sep in args.name or (os.altsep and os.altsep in args.name)
                                  or args.name in (".", "..")):
        parser.error(f"--name: expected a file stem without a path (use --out-dir for the folder), got {args.name!r}")


def noisy_rows(rows, limit: float = NOISE_LIMIT) -> list[str]:
    """One line per timed row whose repeats disagree (p20-p80 spread over ``limit`` of the median), and per
    LoRA row faster than the frozen linear it cannot beat (ratio < 0.95): both mean a busy machine."""
    lines = []
    for row in rows:
        if row.get("status") != "ok" or not row.get("median_ms"):
            continue
        case = f"{row['K']}x{row['N']} T={row['T']} r={row['r']} p={row['p']} {row['provider']} {row['mode']}"
        spread = (row["p80_ms"] - row["p20_ms"]) / row["median_ms"]
        if spread > limit:
            lines.append(f"{case}: p20-p80 spread {100 * spread:.0f}% of the median")
        ratio = row.get("ratio_to_linear")
        if row["provider"] != "linear" and ratio is not None and ratio < 0.95:
            lines.append(f"{case}: {ratio:.2f}x the frozen linear, below the limit")
    return lines


def _progress(items, **kwargs):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, **kwargs)


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def cases_from(args, device) -> list[Case]:
    gpu = device.type == "cuda"
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    nf4 = getattr(args, "base", "dense") == "nf4"
    ranks = args.ranks or ([16] if nf4 else ([16, 64] if gpu else [16]))
    dropouts = args.dropout or ([0.1] if nf4 else [0.0, 0.1])
    if nf4 and not (args.shapes or args.tokens):
        if gpu:
            kn_t = [(K, N, T) for K, N in NF4_GPU_SHAPES for T in ([512] if args.quick else NF4_GPU_TOKENS)]
        else:
            kn_t = NF4_CPU_QUICK_CASES if args.quick else NF4_CPU_CASES
    elif args.shapes or args.tokens:
        shapes = args.shapes or ([(4096, 4096)] if gpu else [(1024, 1024)])
        tokens = args.tokens or ([8192] if gpu else [1024])
        kn_t = [(K, N, T) for K, N in shapes for T in tokens]
    elif gpu:
        kn_t = [(K, N, T) for K, N in GPU_SHAPES for T in ([2048] if args.quick else GPU_TOKENS)]
    else:
        kn_t = CPU_QUICK_CASES if args.quick else CPU_CASES
    return [Case(K, N, T, r, p, dtype) for K, N, T in kn_t for r in ranks for p in dropouts]


def warm(cases, providers, device, part: tuple[int, int]) -> int:
    """Run the fused_lora providers once per case of this part (compiles; nothing is timed or written)."""
    import time

    from .providers import Weights, build, trainable_parameters
    from .sweep import DTYPES, _inputs

    index, count = part
    started = time.perf_counter()
    for case in cases[index::count]:
        dtype = DTYPES[case.dtype]
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        weights = Weights.random(case.K, case.N, case.r, dtype, adapter_dtype, device)
        (x, dy), = _inputs(case, device, 1)
        for name in providers:
            if not name.startswith("fused_lora"):
                continue
            module, _ = build(name, weights, case.r, case.p)
            x.grad = None
            module(x).backward(dy)
            del module
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    print(f"warm part {index}/{count}: {len(cases[index::count])} cases in {time.perf_counter() - started:.1f}s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    nf4 = args.base == "nf4"
    if nf4:
        from fused_lora.quantized import require_bitsandbytes

        try:
            require_bitsandbytes()
        except ImportError as error:
            raise SystemExit(f"--base nf4: {error}") from None
    default_providers = NF4_PROVIDERS if nf4 else PROVIDERS
    providers = [p for p in (args.providers or ",".join(default_providers)).split(",") if p]
    unknown = sorted(set(providers) - set(ALL_PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; expected a subset of {ALL_PROVIDERS}")
    repeats = args.repeats or (3 if args.quick else (25 if device.type == "cuda" else 5))
    if args.latency:
        return latency.main(args, device, providers if args.providers is not None else None)
    cases = [] if args.e2e_only else cases_from(args, device)
    if args.warm_part:
        return warm(cases, providers, device, args.warm_part)
    meta = report.metadata(device)
    stem = args.name or f"{device.type}-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    os.makedirs(args.out_dir, exist_ok=True)
    isa = (f", fused_lora ISA path {meta['isa']}, ATen {meta['aten_cpu_capability']}, MKL {meta['mkl_instructions']}, "
           f"load {meta['load_average']}" if device.type == "cpu" else "")
    print(f"fused_lora benchmark on {meta['device_name']} ({meta['threads']} threads{isa}), torch {meta['torch']}, "
          f"triton {meta['triton']}, peft {meta['peft']}, commit {meta['git_commit']}", flush=True)

    written = []
    rows = []
    if cases:
        csv_path = os.path.join(args.out_dir, f"{stem}.csv")
        csv_writer = report.CsvWriter(csv_path, meta)
        written.append(csv_path)
    for case in _progress(cases, desc="cases", unit="case", file=sys.stderr):
        case_rows = run_case(case, providers, device, repeats)
        csv_writer.append(case_rows)
        rows += case_rows
    if rows:
        print(report.format_table(rows))
        if nf4:
            print()
            print(report.format_memory(rows))

    e2e_rows = []
    if not args.no_e2e:
        size = "cuda" if device.type == "cuda" else ("cpu-quick" if args.quick else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for p in ((0.1,) if nf4 else (0.0, 0.1)):
            e2e_rows += e2e.run(device, size, r=16, p=p, dtype=dtype, repeats=repeats, base=args.base)
        print()
        print(e2e.format_rows(e2e_rows))

    if e2e_rows:
        e2e_path = os.path.join(args.out_dir, f"{stem}-e2e.csv")
        with open(e2e_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(e2e_rows[0]) + report.META_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**meta, **row} for row in e2e_rows)
        written.append(e2e_path)
    noise = noisy_rows(rows)
    json_path = os.path.join(args.out_dir, f"{stem}.json")
    report.write_json(json_path, meta, {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
                                        "cases": len(cases), "providers": providers, "repeats": repeats,
                                        "end_to_end": e2e_rows, "noisy_rows": noise})
    written.append(json_path)
    if noise:
        print(f"\nwarning: noisy timings in {len(noise)} rows (busy machine?); rerun with more --repeats "
              f"on a quiet machine before trusting them:")
        print("\n".join("  " + line for line in noise))
    if rows and not args.no_plot:
        if _can_plot():
            from .plot import plot

            png_path = os.path.join(args.out_dir, f"{stem}.png")
            plot(csv_path, png_path)
            written.append(png_path)
        else:
            print("\nno plot: matplotlib is not installed (pip install matplotlib, or pass --no-plot)")
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in written))
    return 0
