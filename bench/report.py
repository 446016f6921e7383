"""Results: terminal table, CSV rows with metadata columns, JSON metadata."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

import torch

from .timing import MODES

CSV_COLUMNS = ["K", "N", "T", "r", "p", "dtype", "provider", "backend", "mode", "status", "median_ms", "p20_ms",
               "p80_ms", "ratio_to_linear", "ratio_p20", "ratio_p80", "tflops", "saved_bytes", "peak_bytes",
               "weight_bytes"]
META_COLUMNS = ["device", "device_name", "cpu_model", "isa", "aten_cpu_capability", "mkl_instructions", "threads",
                "load_average", "torch", "triton", "peft", "git_commit", "date"]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_path() -> str:
    """The ISA level the C++ backend's loops run ("avx512", "avx2", "baseline"; FUSED_LORA_ISA caps it),
    with the Philox generator's where FUSED_LORA_PHILOX_ISA makes it differ; "no extension" without _C."""
    try:
        from fused_lora import _C  # type: ignore[attr-defined]
    except ImportError:
        return "no extension"
    isa, philox = _C.isa(), _C.philox_isa()
    return isa if philox == isa or (isa, philox) == ("baseline", "scalar") else f"{isa} (philox {philox})"


def aten_cpu_capability() -> str:
    """The ISA of ATen's own vectorised kernels (ATEN_CPU_CAPABILITY caps it)."""
    try:
        return torch.backends.cpu.get_cpu_capability().lower()
    except (AttributeError, RuntimeError):
        return "unknown"


def backend_used(backend: str, K: int, N: int, T: int, r: int, p: float = 0.0) -> str:
    """The backend label of a fused_lora row, with the cpu backend's path for the call: "cpu:fused",
    "cpu:aten", or "cpu:aten+fused" where the forward (no mask: the rule without dropout) takes ATen
    and the shrink and backward the fused loops."""
    if backend != "cpu":
        return backend
    from fused_lora.ops import cpu_ops

    paths = dict.fromkeys("fused" if cpu_ops.fused_path(T, K, N, r, q) else "aten" for q in (0.0, p))
    return "cpu:" + "+".join(paths)


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict:
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "isa": isa_path() if device.type == "cpu" else "",
        "aten_cpu_capability": aten_cpu_capability() if device.type == "cpu" else "",
        # NOTE: MKL_ENABLE_INSTRUCTIONS=AVX2 makes MKL's GEMMs take their AVX2 path too.
        "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default"),
        "threads": torch.get_num_threads(),
        # NOTE: the machine's load when the run started: a busy shared machine stretches every row.
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "fused_lora": _version("fused_lora"),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(rows) -> str:
    """One line per (case, provider): the three modes' medians and ratios to the frozen linear."""
    by_key = {}
    for row in rows:
        key = (row["K"], row["N"], row["T"], row["r"], row["p"], row["dtype"], row["provider"])
        by_key.setdefault(key, {})[row["mode"]] = row
    header = (f"{'case':<30} {'provider':<22} " + " ".join(f"{m + ' ms':>11} {'x lin':>6}" for m in MODES)
              + f" {'TFLOP/s':>8} {'saved MiB':>9}")
    lines = [header, "-" * len(header)]
    last_case = None
    for key, modes in by_key.items():
        K, N, T, r, p, dtype, provider = key
        case = f"{K}->{N} T={T} r={r} p={p} {dtype}"
        if last_case is not None and case != last_case:
            lines.append("")
        first = modes[MODES[0]]
        name = provider + (f"[{first['backend']}]" if first["backend"] else "")
        if first["status"] != "ok":
            lines.append(f"{case:<30} {name:<22} {first['status']}")
        else:
            cells = " ".join(f"{_fmt(modes[m]['median_ms'], '11.2f')} {_fmt(modes[m]['ratio_to_linear'], '6.3f')}"
                             for m in MODES)
            saved = modes["fwd+bwd"]["saved_bytes"]
            lines.append(f"{case:<30} {name:<22} {cells} {_fmt(modes['fwd+bwd']['tflops'], '8.3f')} "
                         f"{_fmt(None if saved is None else saved / 2 ** 20, '9.1f')}")
        last_case = case
    return "\n".join(lines)


def format_memory(rows) -> str:
    """One line per (case, provider): the frozen base's bytes (weights), and what one fwd+bwd saves for
    backward (CPU) or its peak above the start (CUDA), in MiB."""
    lines = [f"{'memory':<30} {'provider':<22} {'weights MiB':>11} {'saved MiB':>9} {'peak MiB':>9}"]
    for row in rows:
        if row["mode"] != "fwd+bwd" or row["status"] != "ok":
            continue
        case = f"{row['K']}->{row['N']} T={row['T']} r={row['r']} p={row['p']} {row['dtype']}"
        mib = [None if row.get(key) is None else row[key] / 2 ** 20 for key in ("weight_bytes", "saved_bytes",
                                                                                "peak_bytes")]
        lines.append(f"{case:<30} {row['provider']:<22} {_fmt(mib[0], '11.2f')} {_fmt(mib[1], '9.2f')} "
                     f"{_fmt(mib[2], '9.2f')}")
    return "\n".join(lines)


class CsvWriter:
    """Rows go to disk as each case finishes, so an interrupted sweep keeps what it measured."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.meta = {c: meta.get(c) for c in META_COLUMNS}
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS + META_COLUMNS).writeheader()

    def append(self, rows) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS + META_COLUMNS, extrasaction="ignore")
            for row in rows:
                writer.writerow({**self.meta, **row})


def write_json(path: str, meta: dict, extra: dict) -> None:
    with open(path, "w") as f:
        json.dump({**meta, **extra}, f, indent=2, sort_keys=True)
        f.write("\n")
