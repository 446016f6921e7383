"""fused_lora: fused LoRA linear layers (Triton on GPU, C++ on CPU, PyTorch fallback)."""

from .backends import available_backends
from .dropout import dropout_mask
from .function import FusedLoRAFunction
from .functional import fused_lora_linear
from .layer import FusedLoRALinear
from .reference import lora_linear_reference
from . import reference

__all__ = [
    "FusedLoRAFunction",
    "FusedLoRALinear",
    "available_backends",
    "dropout_mask",
    "fused_lora_linear",
    "lora_linear_reference",
    "reference",
]
__version__ = "0.1.0"
