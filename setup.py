"""fused_lora: the packages fused_lora and fused_lora.kernels (from kernels/),
and the optional C++ CPU backend fused_lora._C (from csrc/).

FUSED_LORA_SKIP_EXT=1 skips the C++ build; so does an environment without
torch's extension tooling. Without the extension the "cpu" backend is simply
unavailable and CPU tensors run on the "torch" backend.
"""

import glob
import os
import sys

from setuptools import setup


def extension_kwargs():
    """ext_modules and cmdclass for fused_lora._C, or {} when it is not built."""
    if os.environ.get("FUSED_LORA_SKIP_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as error:  # torch missing or broken: install the Python package only
        print(f"fused_lora: not building the C++ extension ({error!r})", file=sys.stderr)
        return {}
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
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="fused_lora",
    version="0.1.0",
    description="Fused LoRA linear layers: Triton kernels (GPU), C++ (CPU), PyTorch fallback",
    packages=["fused_lora", "fused_lora.kernels"],
    package_dir={"fused_lora": "fused_lora", "fused_lora.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "peft"]},
    entry_points={"console_scripts": ["fused-lora-memory=fused_lora.memory:main"]},
    **extension_kwargs(),
)
