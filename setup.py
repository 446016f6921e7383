"""fused_lora: the packages fused_lora and fused_lora.kernels (from kernels/)."""

from setuptools import setup

setup(
    name="fused_lora",
    version="0.1.0",
    description="Fused LoRA linear layers: Triton kernels (GPU), C++ (CPU), PyTorch fallback",
    packages=["fused_lora", "fused_lora.kernels"],
    package_dir={"fused_lora": "fused_lora", "fused_lora.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "peft"]},
)
