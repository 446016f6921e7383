"""The tuning file: which GEMM strategy each shape class uses, decided once, read by every process.

Timing the candidates in every process makes the choice depend on timing noise: two
processes, or two DDP ranks, may then run different kernels for the same shape, and
their y and dx differ in the last bits. So no training process times anything. The
choices come from a JSON file written ahead of time by ``python -m bench.tune`` (run
it once per machine kind, outside training); where the file has no entry for a shape
class, the heuristic default is used. Every process and every rank that reads the same
file runs the same kernels.

* Path: ``FUSED_LORA_TUNING_FILE``, else ``$XDG_CACHE_HOME/fused_lora/tuning.json``
  (``~/.cache/fused_lora/tuning.json``). Nothing is ever written into the package, and
  only ``python -m bench.tune`` writes the file (atomically: readers see the old file or
  the new one). For several nodes, point ``FUSED_LORA_TUNING_FILE`` at one shared file.
* ``FUSED_LORA_AUTOTUNE=0``: the file is not read; every GEMM takes its heuristic default.
* Keys: the machine (GPU name, torch, Triton and fused_lora versions), then the operation
  and shape class (dtypes, N, K, r, flags, T rounded up to a power of two). Entries of
  other machines or versions are not used: the heuristic default runs, with one warning
  per process naming the file.
* A file that is not a tuning file (not JSON, another format) is an error naming the
  path, at the first call that needs it: a silent fallback would let ranks differ.
  An entry whose strategy this version no longer offers is ignored with a warning.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import threading
import warnings

import torch

FORMAT = "fused_lora tuning 1"
ENV_VAR = "FUSED_LORA_TUNING_FILE"
_LOCK = threading.Lock()
_CACHE: dict = {}  # path -> ((mtime_ns, size), parsed file)
_WARNED: set = set()


def path() -> str:
    """The tuning file this process reads: FUSED_LORA_TUNING_FILE, else the user's cache folder."""
    chosen = os.environ.get(ENV_VAR, "").strip()
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fused_lora", "tuning.json")


@functools.lru_cache(maxsize=None)
def _device_name(device_type: str, index: int | None) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return f"{device_type} (Triton interpreter)"


def machine_key(device: torch.device) -> str:
    """What must match for a choice to carry over: the device kind and the versions that build its kernels."""
    import triton

    from ... import __version__

    return (f"{_device_name(device.type, device.index)} | torch {torch.__version__} | triton {triton.__version__} "
            f"| fused_lora {__version__}")


def entry_key(op_key: tuple) -> str:
    """The operation and shape class of a tuner key, without the device (the machine key holds it)."""
    return " ".join(str(part).replace("torch.", "") for part in op_key if not isinstance(part, torch.device))


def _invalid(file: str, why: str) -> ValueError:
    return ValueError(f"{ENV_VAR}: {file} is not a fused_lora tuning file ({why}). Delete it or write it again "
                      f"with python -m bench.tune, point {ENV_VAR} elsewhere, or set FUSED_LORA_AUTOTUNE=0 to "
                      f"ignore tuning files")


def _validate(file: str, data) -> dict:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _invalid(file, f"expected format {FORMAT!r}, found {found!r}")
    machines = data.get("machines")
    if not isinstance(machines, dict):
        raise _invalid(file, "no 'machines' object")
    for machine, entries in machines.items():
        if not isinstance(entries, dict):
            raise _invalid(file, f"machine {machine!r} is not an object")
        for key, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("choice"), str):
                raise _invalid(file, f"entry {key!r} of {machine!r} has no 'choice' string")
    return data


def read(file: str) -> dict | None:
    """The parsed file (None when there is none); re-read only when it changed on disk."""
    try:
        stat = os.stat(file)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise _invalid(file, f"{type(error).__name__}: {error}") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        cached = _CACHE.get(file)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(file, f"{type(error).__name__}: {error}") from None
    data = _validate(file, data)
    with _LOCK:
        _CACHE[file] = (stamp, data)
    return data


def _warn_once(key, message: str) -> None:
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def lookup(op_key: tuple, device: torch.device, labels) -> tuple[str | None, str]:
    """(label, where it came from) of the file's choice for ``op_key``; label None: use the default.

    ``labels``: the candidates this version offers for the call.
    """
    file = path()
    data = read(file)
    if data is None:
        return None, "default (no tuning file)"
    machine = machine_key(device)
    entries = data["machines"].get(machine)
    if entries is None:
        _warn_once((file, machine), f"fused_lora: the tuning file {file} has no entries for this machine ({machine}): "
                                    f"heuristic defaults (python -m bench.tune writes them)")
        return None, "default (no entries for this machine in the tuning file)"
    entry = entries.get(entry_key(op_key))
    if entry is None:
        return None, "default (shape class not in the tuning file)"
    if entry["choice"] not in labels:
        _warn_once((file, machine, entry_key(op_key)),
                   f"fused_lora: the tuning file {file} chooses {entry['choice']!r} for {entry_key(op_key)}, which "
                   f"this version does not offer ({', '.join(labels)}): heuristic default")
        return None, "default (the tuning file's choice is not offered)"
    return entry["choice"], f"tuning file {file}"


def write(file: str, device: torch.device, decisions: dict) -> int:
    """Merge ``{op_key: {"choice": label, "timings_ms": ..., "failures": ...}}`` into ``file`` (created
    with its folders if absent), atomically. Returns the number of entries written."""
    data = copy.deepcopy(read(file)) or {"format": FORMAT, "machines": {}}
    entries = data["machines"].setdefault(machine_key(device), {})
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for op_key, decision in decisions.items():
        entries[entry_key(op_key)] = dict(decision, date=stamp)
    folder = os.path.dirname(file)
    if folder:
        os.makedirs(folder, exist_ok=True)
    temporary = f"{file}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, file)
    return len(decisions)
