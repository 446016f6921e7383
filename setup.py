"""fused_lora: the package fused_lora (with fused_lora.kernels from kernels/triton/),
and the C++ CPU backend fused_lora._C (from csrc/).

Install from a clone (pyproject.toml names the build tools; pip skips that list with
--no-build-isolation, so they are installed by hand):

    pip install torch                         # CPU-only machine: add --index-url https://download.pytorch.org/whl/cpu
    pip install --upgrade setuptools wheel ninja
    pip install --no-build-isolation -e .     # or `.` for a copy in site-packages
    python -c "import fused_lora; print(fused_lora.available_backends())"

``-e`` builds fused_lora._C inside the clone, so scripts run from the clone and from elsewhere
use the same build. After ``pip install .``, the clone itself has no _C: importing it from the
repository root (which comes first on sys.path) stops with an ImportError saying what to do,
rather than silently running the checkout on the slower torch backend.

Building the C++ backend needs torch installed first (so pip needs
``--no-build-isolation``), a C++ compiler (g++ or clang++), and preferably ninja
(parallel, incremental builds). It is never dropped silently: without torch or a
compiler the build stops with a message saying what to do. FUSED_LORA_SKIP_EXT=1
installs the Python package alone, on purpose; CPU tensors then run on the slower
"torch" backend, with a warning at first use.
"""

import glob
import os
import re
import shutil
import sys
import time

from setuptools import setup

# NOTE: torch.library.custom_op / register_fake, torch.is_autocast_enabled(device_type) and
# torch.get_autocast_dtype arrived in torch 2.4; fused_lora/__init__.py checks the same floor.
MIN_TORCH = "2.4"
SKIP_VARIABLE = "FUSED_LORA_SKIP_EXT"


def _message(text: str) -> None:
    print(f"fused_lora: {text}", file=sys.stderr, flush=True)


def _stop(text: str) -> None:
    raise SystemExit(f"fused_lora: {text}\n  To install without the C++ CPU backend on purpose, set {SKIP_VARIABLE}=1.")


def _build_extension_class(base):
    class BuildExtension(base):
        """torch's BuildExtension, saying what it builds, with what, how long it took, and what to do on failure."""

        def run(self):
            compiler = os.environ.get("CXX") or "c++"
            if shutil.which(compiler) is None:
                _stop(f"building the C++ CPU backend needs a C++ compiler, and {compiler!r} was not found "
                      f"(install g++ or clang++, e.g. `apt-get install g++`, or set CXX).")
            sources = sum(len(extension.sources) for extension in self.extensions)
            ninja = shutil.which("ninja") is not None
            _message(f"building the C++ CPU backend fused_lora._C: {sources} files with {compiler}, "
                     + ("ninja found (parallel). " if ninja else "ninja not found: one file at a time "
                        "(`pip install ninja` makes it faster). ")
                     + "Takes minutes on a small machine; `pip install -v` shows each file as it compiles.")
            started = time.perf_counter()
            try:
                super().run()
            except Exception as error:
                _stop(f"building the C++ CPU backend failed ({type(error).__name__}: {error}); "
                      f"the compiler's messages are above.")
            _message(f"built fused_lora._C in {time.perf_counter() - started:.0f} s")

    return BuildExtension


def _env_flag(name: str) -> bool:
    """A switch parsed as the package parses it (fused_lora/env.py, loaded by path: the package is not built yet)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_lora", "env.py")
    spec = importlib.util.spec_from_file_location("_fused_lora_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.env_flag(name, False) is True
    except ValueError as error:
        _stop(str(error))


def check_wheel_tools() -> None:
    """Stop with what to install when setuptools cannot build the wheel pip asks for.

    pip with ``--no-build-isolation`` builds with the setuptools and wheel already installed, and
    a fresh venv's are not enough: Python 3.11's setuptools 65 has no bdist_wheel without the
    ``wheel`` package (bdist_wheel is built into setuptools since 70.1), and 3.12's venv has no
    setuptools at all (pip then fails before this file runs).
    """
    if not {"bdist_wheel", "editable_wheel", "dist_info"} & set(sys.argv[1:]):
        return
    import setuptools

    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if version >= (70, 1):
        return
    try:
        import wheel  # noqa: F401
    except ImportError:
        raise SystemExit(f"fused_lora: building a wheel with setuptools {setuptools.__version__} needs the `wheel` "
                         f"package, which is not installed (pip's --no-build-isolation uses what is installed). "
                         f"Run `pip install --upgrade setuptools wheel ninja`, then install again.") from None


def extension_kwargs():
    """ext_modules and cmdclass for fused_lora._C, or {} when FUSED_LORA_SKIP_EXT is on (1/true/yes/on)."""
    if _env_flag(SKIP_VARIABLE):
        _message(f"{SKIP_VARIABLE}={os.environ[SKIP_VARIABLE]}: installing without the C++ CPU backend (CPU "
                 f"tensors will run on the slower 'torch' backend)")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as error:  # noqa: BLE001 (torch missing or broken)
        _stop(f"cannot build the C++ CPU backend: torch is not importable here ({type(error).__name__}: {error}). "
              f"Install torch>={MIN_TORCH} first, then `pip install --no-build-isolation .` (pip's default build "
              f"isolation hides the installed torch).")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < tuple(int(part) for part in MIN_TORCH.split(".")):
        _stop(f"fused_lora needs torch>={MIN_TORCH}, and the build sees torch {torch.__version__}.")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(path, here) for path in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    # NOTE: -fopenmp makes at::parallel_for (an inline OpenMP region in the
    # headers) actually parallel, matching torch's own OpenMP runtime.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    extension = CppExtension(
        name="fused_lora._C",
        sources=sources,
        extra_compile_args=["-O3", "-ffp-contract=fast", "-Wno-psabi"] + openmp,
        extra_link_args=openmp,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": _build_extension_class(BuildExtension)}}


check_wheel_tools()
setup(
    name="fused_lora",
    version="0.1.0",
    description="Fused LoRA linear layers: Triton kernels (GPU), C++ (CPU), PyTorch fallback",
    license="MIT",
    license_files=["LICENSE"],
    # NOTE: the Triton kernels live in kernels/triton/ (installed as fused_lora.kernels), and the
    # top-level kernels/ has no __init__.py: a regular package there would shadow Hugging Face's
    # installed `kernels` (which transformers uses, and whose setuptools entry point runs in this
    # very build) for anything run from the repository root.
    packages=["fused_lora", "fused_lora.kernels", "fused_lora.ops", "fused_lora.ops.triton_ops",
              "fused_lora.integrations", "fused_lora.memory"],
    package_dir={"fused_lora": "fused_lora", "fused_lora.kernels": "kernels/triton"},
    package_data={"fused_lora.memory": ["configs/*.json"]},
    python_requires=">=3.9",
    install_requires=[f"torch>={MIN_TORCH}", "numpy"],
    # NOTE: qlora pins bitsandbytes: fused_lora reads its 4-bit layout (fused_lora/quantized.py) as 0.50.2 stores it.
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "hypothesis", "peft", "transformers"],
                    "calculator": ["transformers"], "qlora": ["bitsandbytes==0.50.2"]},
    entry_points={"console_scripts": ["fused-lora-memory=fused_lora.memory:main"]},
    **extension_kwargs(),
)
