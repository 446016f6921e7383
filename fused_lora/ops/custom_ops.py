"""The backend operations registered as PyTorch custom ops, for torch.compile only.

``torch.library.custom_op`` makes each operation one opaque node in a compiled graph,
with a fake implementation that only computes output shapes and dtypes (no data), as
vLLM does for its LoRA kernels. The real implementation dispatches to the chosen
backend (``fused_lora.ops.torch_ops`` / ``cpu_ops`` / ``triton_ops``; same interface).

Eager calls do not come here: ``FusedLoRAFunction`` calls the backends directly
(the dispatcher, autograd redispatch and schema checks cost more host time than a
small layer's kernels). Only while torch.compile traces (``torch.compiler.is_compiling()``)
does the Function route through these ops.

Differences from the backend interface, to fit custom-op schemas:

* the dropout seed is a 0-d int64 tensor (on the CPU, or on the input's device for
  the triton backend, which reads it in its kernels), so drawing it with
  ``torch.randint`` stays in the graph (no ``.item()`` graph break);
* the packed keep mask of the shrink is an empty (0,) uint8 tensor when the backend
  saves none, and ``lora_backward`` always returns three tensors, an empty (0,) one
  for each that was not asked for.

A 4-bit base (``fused_lora.quantized.Weight4bit``) enters ``lora_forward_4bit`` and
``lora_backward_4bit`` as its tensors and constants (``Weight4bit.tensors()`` and ``.meta()``),
never as a Python object; each op dequantizes into the package's buffer inside itself, so no
dense weight is a graph value that the compiler could save between forward and backward.

The ops run with autocast disabled: the caller (``fused_lora_linear``) casts the inputs
to the autocast dtype first, as ``F.linear`` does, and the kernels then keep their own
precision (fp32 accumulation, adapters in their own dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..checks import check_seed_value
from .backends import backend_ops, saves_keep_bits
from .torch_ops import accumulation_dtype
from .. import quantized
from ..quantized import Weight4bit

LIBRARY = "fused_lora"


def _seed_arg(seed: Tensor, backend: str):
    """The seed as ``backend`` takes it; a CPU seed's value is checked here, as eager calls check it
    before the Function (tracing saw no value). The triton backend reads a CUDA seed on the device."""
    if seed.device.type != "cpu":
        return seed
    value = check_seed_value(int(seed.item()))
    return seed if backend == "triton" else value


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cpu", enabled=torch.is_autocast_enabled("cpu"))


@torch.library.custom_op(f"{LIBRARY}::lora_shrink", mutates_args=())
def lora_shrink(x2d: Tensor, lora_A: Tensor, seed: Tensor, dropout_p: float, backend: str) -> tuple[Tensor, Tensor]:
    """``(xa, keep_bits)``: xa = D(x) A^T, (T, r) in the accumulation dtype; keep_bits empty if not saved."""
    with _no_autocast(x2d.device):
        xa, bits = backend_ops(backend).lora_shrink(x2d, lora_A, _seed_arg(seed, backend), dropout_p)
    return xa, bits if bits is not None else x2d.new_empty((0,), dtype=torch.uint8)


@lora_shrink.register_fake
def _lora_shrink_fake(x2d, lora_A, seed, dropout_p, backend):
    T, K = x2d.shape
    xa = x2d.new_empty((T, lora_A.shape[0]), dtype=accumulation_dtype(x2d.dtype))
    bits_shape = (T, (K + 7) // 8) if saves_keep_bits(backend, dropout_p, x2d.dtype) else (0,)
    return xa, x2d.new_empty(bits_shape, dtype=torch.uint8)


@torch.library.custom_op(f"{LIBRARY}::lora_forward", mutates_args=())
def lora_forward(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_B: Tensor, xa: Tensor,
                 scaling: float, backend: str) -> Tensor:
    """``y = x W^T + b + scaling * xa B^T``, (T, N) in x's dtype."""
    with _no_autocast(x2d.device):
        return backend_ops(backend).lora_forward(x2d, weight, bias, lora_B, xa, scaling)


@lora_forward.register_fake
def _lora_forward_fake(x2d, weight, bias, lora_B, xa, scaling, backend):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


@torch.library.custom_op(f"{LIBRARY}::lora_backward", mutates_args=())
def lora_backward(dy: Tensor, x2d: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                  xa: Tensor, scaling: float, seed: Tensor, dropout_p: float, keep_bits: Tensor,
                  needs_dx: bool, needs_dA: bool, needs_dB: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``; each one not asked for is an empty (0,) tensor."""
    with _no_autocast(dy.device):
        grads = backend_ops(backend).lora_backward(
            dy, x2d, weight, lora_A, lora_B, xa, scaling, _seed_arg(seed, backend), dropout_p,
            keep_bits if keep_bits.numel() else None, needs_dx, needs_dA, needs_dB)
    return _grads_or_empty(dy, lora_A, lora_B, *grads)


def _grads_or_empty(dy, lora_A, lora_B, dx, dA, dB):
    """(dx, dA, dB) with an empty (0,) tensor for each one that is None (not asked for)."""
    # NOTE: a fresh empty tensor for each absent output: custom-op outputs may not alias each other.
    return (dx if dx is not None else dy.new_empty((0,)),
            dA if dA is not None else lora_A.new_empty((0,)),
            dB if dB is not None else lora_B.new_empty((0,)))


def _grads_fake(dy, lora_A, lora_B, in_features, needs_dx, needs_dA, needs_dB):
    """The fake (dx, dA, dB) of a backward op: (T, K), lora_A's and lora_B's shapes, or (0,) where not asked for."""
    dx = dy.new_empty((dy.shape[0], in_features) if needs_dx else (0,))
    dA = lora_A.new_empty(tuple(lora_A.shape) if needs_dA else (0,))
    dB = lora_B.new_empty(tuple(lora_B.shape) if needs_dB else (0,))
    return dx, dA, dB


@lora_backward.register_fake
def _lora_backward_fake(dy, x2d, weight, lora_A, lora_B, xa, scaling, seed, dropout_p, keep_bits,
                        needs_dx, needs_dA, needs_dB, backend):
    return _grads_fake(dy, lora_A, lora_B, weight.shape[1], needs_dx, needs_dA, needs_dB)


def _weight_4bit(packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                 nested_blocksize, quant_type, quant_dtype) -> Weight4bit:
    return Weight4bit.from_parts((packed, absmax, code, nested_absmax, nested_code, offset),
                                 (out_features, in_features, blocksize, nested_blocksize, quant_type, quant_dtype))


@torch.library.custom_op(f"{LIBRARY}::lora_forward_4bit", mutates_args=())
def lora_forward_4bit(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                      nested_code: Optional[Tensor], offset: Optional[Tensor], out_features: int, in_features: int,
                      blocksize: int, nested_blocksize: int, quant_type: str, quant_dtype: torch.dtype,
                      bias: Optional[Tensor], lora_B: Tensor, xa: Tensor, scaling: float, backend: str) -> Tensor:
    """``lora_forward`` with the weight given as a 4-bit weight's parts (dequantized inside)."""
    w4 = _weight_4bit(packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                      nested_blocksize, quant_type, quant_dtype)
    with _no_autocast(x2d.device):
        return quantized.lora_forward_4bit(backend, x2d, w4, bias, lora_B, xa, scaling)


@lora_forward_4bit.register_fake
def _lora_forward_4bit_fake(x2d, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features,
                            blocksize, nested_blocksize, quant_type, quant_dtype, bias, lora_B, xa, scaling, backend):
    return x2d.new_empty((x2d.shape[0], out_features))


@torch.library.custom_op(f"{LIBRARY}::lora_backward_4bit", mutates_args=())
def lora_backward_4bit(dy: Tensor, x2d: Optional[Tensor], packed: Tensor, absmax: Tensor, code: Tensor,
                       nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                       out_features: int, in_features: int, blocksize: int, nested_blocksize: int, quant_type: str,
                       quant_dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scaling: float,
                       seed: Tensor, dropout_p: float, keep_bits: Tensor, needs_dx: bool, needs_dA: bool,
                       needs_dB: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``lora_backward`` with the weight given as a 4-bit weight's parts (dequantized inside, for dx only)."""
    w4 = _weight_4bit(packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize,
                      nested_blocksize, quant_type, quant_dtype)
    bits = keep_bits if keep_bits.numel() else None
    with _no_autocast(dy.device):
        grads = quantized.lora_backward_4bit(backend, dy, x2d, w4, lora_A, lora_B, xa, scaling,
                                             _seed_arg(seed, backend), dropout_p, bits, needs_dx, needs_dA, needs_dB)
    return _grads_or_empty(dy, lora_A, lora_B, *grads)


@lora_backward_4bit.register_fake
def _lora_backward_4bit_fake(dy, x2d, packed, absmax, code, nested_absmax, nested_code, offset, out_features,
                             in_features, blocksize, nested_blocksize, quant_type, quant_dtype, lora_A, lora_B, xa,
                             scaling, seed, dropout_p, keep_bits, needs_dx, needs_dA, needs_dB, backend):
    return _grads_fake(dy, lora_A, lora_B, in_features, needs_dx, needs_dA, needs_dB)
