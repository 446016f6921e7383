"""fused_lora: fused LoRA linear layers (Triton on GPU, C++ on CPU, PyTorch fallback)."""

from .backends import available_backends
from .dropout import dropout_mask
from .function import FusedLoRAFunction
from .functional import fused_lora_linear
from .layer import FusedLoRALinear
from .adapters import load_adapter, save_adapter
from .parameters import count_parameters, print_trainable_parameters
from .peft_interop import apply_lora, from_peft
from .reference import lora_linear_reference
from . import reference

__all__ = [
    "FusedLoRAFunction",
    "FusedLoRALinear",
    "apply_lora",
    "available_backends",
    "count_parameters",
    "dropout_mask",
    "from_peft",
    "fused_lora_linear",
    "load_adapter",
    "lora_linear_reference",
    "print_trainable_parameters",
    "reference",
    "save_adapter",
]
__version__ = "0.1.0"
