"""Which implementation runs a call: "triton", "cpu" or "torch".

* ``triton``: the Triton kernels in ``fused_lora.kernels``; CUDA tensors, and CPU
  tensors when ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU).
* ``cpu``: the C++ extension ``fused_lora._C`` (CPU tensors), when it was built.
* ``torch``: the pure-PyTorch composite; runs everywhere.

``backend=None`` picks triton on CUDA, cpu on CPU where built, else torch. The
environment variable ``FUSED_LORA_BACKEND`` overrides ``None``. A backend asked
for by name that cannot run the call is an error, never a silent fallback.

On CPU, "never slower than the torch backend" is kept inside the cpu backend: per
call it runs its fused C++ loops or an ATen path (the torch backend's GEMMs with
the C++ Philox mask), by a rule measured on both ISA paths over a grid of shapes
(``fused_lora.ops.cpu_ops.fused_path``; ``python -m bench.cpu_dispatch``; docs/design.md, docs/benchmarks.md).
The choice needs the call's shapes, which ``backend_name_for`` does not see, and it
stays a function of the shapes, dropout and ISA level, never of the machine's load.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
import warnings
from types import ModuleType

import torch

from ..env import env_choice, env_flag

BACKEND_NAMES = ("triton", "cpu", "torch")
ENV_VAR = "FUSED_LORA_BACKEND"
_warned_cpu_fallback = False

# How the triton backend's backward gets the dropout mask: "bits" = the shrink saves it
# packed, 1 bit per element (T * ceil(K / 8) bytes); "seed" = regenerated from the seed.
# Read once, here (FUSED_LORA_DROPOUT_MASK; unset or empty: "bits").
TRITON_MASK_MODES = ("bits", "seed")
TRITON_MASK_MODE = env_choice("FUSED_LORA_DROPOUT_MASK", TRITON_MASK_MODES, "bits")


def saves_keep_bits(backend: str, dropout_p: float, dtype) -> bool:
    """Whether ``backend``'s shrink saves the packed keep mask for backward.

    NOTE: not for fp64 (gradcheck's dtype, where speed does not matter): Triton 3.6 fails to
    lower the fp64 dA kernel that reads the bits (an fp64 MMA it does not support).
    """
    return backend == "triton" and dropout_p > 0.0 and TRITON_MASK_MODE == "bits" and dtype != torch.float64


def triton_interpret_mode() -> bool:
    """TRITON_INTERPRET, a switch (``fused_lora.env``): Triton's interpreter runs the kernels on CPU tensors."""
    return env_flag("TRITON_INTERPRET", False) is True


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed versions, or None.

    Triton before 3.7 takes a loop bound's index as ``int()`` of a one-element array, which NumPy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel
    with a runtime loop bound would fail inside the interpreter."""
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} (it "
                f"converts one-element arrays with int(), which NumPy 2.4 refuses; fixed in Triton 3.7): "
                f"install triton>=3.7 or numpy<2.4")
    return None


def _interpreter_runs() -> bool:
    return triton_interpret_mode() and triton_interpreter_problem() is None


@functools.lru_cache(maxsize=None)
def _cpu_extension():
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def _triton_runs_on(device: torch.device) -> bool:
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreter_runs()


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "triton":
        return _triton_runs_on(device)
    if name == "cpu":
        return device.type == "cpu" and _cpu_extension() is not None
    return True


def available_backends() -> list[str]:
    """Backends that can run on this machine, for some device, in preference order."""
    names = []
    if _triton_importable() and (_interpreter_runs() or torch.cuda.is_available()):
        names.append("triton")
    if _cpu_extension() is not None:
        names.append("cpu")
    names.append("torch")
    return names


def backend_name_for(device: torch.device, backend: str | None = None) -> str:
    """The backend that runs a call on ``device``; raises if a named backend cannot."""
    source = "backend"
    if backend is None:
        backend = env_choice(ENV_VAR, BACKEND_NAMES, None)  # a ValueError naming the variable for a bad value
        source = f"environment variable {ENV_VAR}"
    if backend is None:
        if device.type == "cuda" and _triton_runs_on(device):
            return "triton"
        if device.type == "cpu" and _cpu_extension() is not None:
            return "cpu"
        if device.type == "cpu":
            _warn_cpu_fallback()
        return "torch"
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected None or one of {BACKEND_NAMES}, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{source}: expected one of {BACKEND_NAMES}, got {backend!r}")
    if not _runs_on(backend, device):
        problem = triton_interpreter_problem() if device.type == "cpu" and triton_interpret_mode() else None
        why = {
            "triton": problem or "it needs triton and a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors",
            "cpu": "it needs a CPU tensor and the compiled extension fused_lora._C",
            "torch": "",
        }[backend]
        raise ValueError(f"{source}: backend {backend!r} cannot run on device {device}: {why} "
                         f"(available here: {available_backends()})")
    return backend


def _warn_cpu_fallback() -> None:
    """Once per process: CPU calls run on "torch" because fused_lora._C is not built."""
    global _warned_cpu_fallback
    if _warned_cpu_fallback:
        return
    _warned_cpu_fallback = True
    # Attribute the warning to the first caller outside this package.
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, stacklevel = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn("fused_lora: the C++ CPU backend (fused_lora._C) is not built, so CPU tensors "
                  "run on the slower 'torch' backend. Build it with `python setup.py build_ext "
                  "--inplace` (FUSED_LORA_SKIP_EXT=1 skips it).", stacklevel=stacklevel)


_OPS: dict[str, ModuleType] = {}


def backend_ops(name: str) -> ModuleType:
    """The module implementing a backend's operations (imported on first use)."""
    ops = _OPS.get(name)
    if ops is None:
        module = {"triton": "triton_ops", "cpu": "cpu_ops", "torch": "torch_ops"}.get(name) \
            if isinstance(name, str) else None
        if module is None:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")
        ops = _OPS[name] = importlib.import_module(f"{__package__}.{module}")
    return ops
