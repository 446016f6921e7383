"""The autograd Function: the only place where autograd lives.

Eager calls go straight to the backend's launchers (``backend_ops(name)``): one
Python frame per link of the chain, and the launchers' cached plans make each
call a few dictionary lookups plus the kernel launches. While torch.compile
traces (``torch.compiler.is_compiling()``) the same operations go through their
custom-op registrations (``fused_lora.custom_ops``), so the compiled graph holds
them as opaque nodes with fake implementations and no graph breaks. Both roads
call the same launchers with the same plans: their results are bit-identical.

Saved for backward: x (a reference to the caller's tensor, no copy; only when
lora_A needs a gradient), xa = D(x) A^T of shape (T, r) in fp32 (fp64 for fp64
inputs), the seed (an int, or a 0-d int64 tensor that the triton backend reads on
the device), and, for the triton backend in its default "bits" mask mode, the
packed keep mask (1 bit per element of x: T * ceil(K / 8) bytes). Never an
unpacked mask, never D(x).

A 4-bit base (a bitsandbytes ``Params4bit``, or a ``fused_lora.quantized.Weight4bit``) is
dequantized into the package's reused buffer for the forward GEMM
(``fused_lora.quantized.dequantized``), and again in backward for dx: what is saved is its
packed bytes and quantization statistics (references, no copy), never a dense (N, K) weight.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from .ops import custom_ops
from .ops.backends import backend_ops, saves_keep_bits
from .checks import MAX_SEED, check_dropout_p, check_seed, check_seed_tensor
from .ops.torch_ops import accumulation_dtype
from .quantized import Weight4bit, as_weight_4bit, lora_backward_4bit, lora_forward_4bit


def seed_argument(seed):
    """None, an int in [0, 2**63), or a 0-d int64 tensor (its value checked where reading it is free)."""
    if seed is None:
        return None
    if type(seed) is int and 0 <= seed < MAX_SEED:
        return seed
    if isinstance(seed, torch.Tensor):
        return check_seed_tensor(seed)
    return check_seed(seed)  # a TypeError or ValueError naming the seed


def _seed_tensor(seed) -> torch.Tensor:
    """The seed as the custom ops take it (compile road)."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(0 if seed is None else seed, dtype=torch.int64)


ONCE_DIFFERENTIABLE = (
    "fused_lora computes first derivatives only: its gradients cannot be differentiated again "
    "(double backward through a backward run with create_graph=True)")
UNSAVED_X = (
    "with lora_A frozen, x is not saved for backward, so a second derivative of dB with respect to x "
    "could not even be detected; give lora_A requires_grad=True or leave create_graph off")


def _element(t: torch.Tensor) -> torch.Tensor:
    """A 0-d view of t's first element: a graph edge to t without a copy."""
    return t[(0,) * t.dim()]


def _once_differentiable(grads, anchors):
    """Gradients whose grad_fn raises ``ONCE_DIFFERENTIABLE`` (backward ran with create_graph=True).

    The kernels build no graph: without this, a second derivative through the layer would
    silently miss every term that passes through it. ``torch.autograd.function.once_differentiable``
    links its error to detached copies, which ``torch.autograd.grad(..., inputs)`` prunes
    away (it returns None); here the error node's edges lead to what the gradients
    depend on (dy, x, lora_A, lora_B), so any second derivative that would pass through
    the layer reaches it and raises. The csrc node does the same.
    """
    present = [g for g in grads if g is not None]
    edges = [_element(a) for a in anchors if a is not None and a.requires_grad and a.numel()]
    if not present or not edges:
        return grads  # nothing they depend on needs a gradient: no second derivative exists
    err_fn = torch._C._functions.DelayedError(ONCE_DIFFERENTIABLE.encode(), len(present) + len(edges))
    wrapped = iter(err_fn(*[g.detach() for g in present], *edges))
    return tuple(None if g is None else next(wrapped) for g in grads)


def _no_autocast(device: torch.device):
    # NOTE: the caller already cast the inputs as F.linear would; the backends' own torch
    # ops (the torch backend's mm, the hybrid's addmm_) must not be cast again.
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class FusedLoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * (D(x) A^T) B^T`` with gradients for x, lora_A and lora_B only.

    ``seed``: None (no dropout), an int in [0, 2**63), or a 0-d int64 tensor holding one;
    required when ``dropout_p > 0``. ``backend``: "triton", "cpu" or "torch".
    ``weight``: a dense (N, K) tensor, or a bitsandbytes 4-bit ``Params4bit`` (a
    ``fused_lora.quantized.Weight4bit``), computed in x's dtype.
    dropout_p, seed and backend are checked here; the tensors' shapes, dtypes and devices are
    not (``fused_lora_linear`` checks them, on its fast path): call it with what
    ``fused_lora_linear`` accepts.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, backend: str):
        if type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0:
            dropout_p = check_dropout_p(dropout_p)  # a TypeError or ValueError naming dropout_p
        if dropout_p > 0.0:
            if seed is None:
                raise ValueError("seed: expected an int in [0, 2**63) or a 0-d int64 tensor when dropout_p > 0 "
                                 "(FusedLoRAFunction.apply draws none; fused_lora_linear does)")
            if type(seed) is not torch.Tensor:
                seed = seed_argument(seed)
            elif seed.dim() or seed.dtype != torch.int64 or seed.device.type == "cpu":
                seed = seed_argument(seed)  # checks the value where that costs no device sync
        else:
            seed = None
        w4 = as_weight_4bit(weight)
        out_features, in_features = weight.shape if w4 is None else w4.shape
        x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
        rows, rank = x2d.shape[0], lora_A.shape[0]
        has_bits = saves_keep_bits(backend, dropout_p, x.dtype)
        bits = None
        if rows == 0 or x2d.is_meta:
            # Shapes only: an empty batch, or a model built on the meta device.
            xa = x2d.new_empty((rows, rank), dtype=accumulation_dtype(x.dtype))
            bits = x2d.new_empty((rows, (in_features + 7) // 8), dtype=torch.uint8) if has_bits else None
            y2d = x2d.new_empty((rows, out_features)) if x2d.is_meta else x2d.new_zeros((rows, out_features))
        elif torch.compiler.is_compiling():
            seed = _seed_tensor(seed)
            xa, bits = custom_ops.lora_shrink(x2d, lora_A, seed, dropout_p, backend)
            if w4 is None:
                y2d = custom_ops.lora_forward(x2d, weight, bias, lora_B, xa, scaling, backend)
            else:
                y2d = custom_ops.lora_forward_4bit(x2d, *w4.tensors(), *w4.meta(), bias, lora_B, xa, scaling,
                                                   backend)
            bits = bits if has_bits else None
        else:
            ops = backend_ops(backend)
            with _no_autocast(x2d.device):
                xa, bits = ops.lora_shrink(x2d, lora_A, seed, dropout_p)
                if w4 is None:
                    y2d = ops.lora_forward(x2d, weight, bias, lora_B, xa, scaling)
                else:
                    y2d = lora_forward_4bit(backend, x2d, w4, bias, lora_B, xa, scaling)
        # NOTE: x is needed only for dA; skip the reference when lora_A is frozen.
        needs_dA = ctx.needs_input_grad[3]
        seed_tensor = seed if isinstance(seed, torch.Tensor) else None
        if w4 is None:
            ctx.save_for_backward(x2d if needs_dA else None, weight, lora_A, lora_B, xa, seed_tensor, bits)
            ctx.weight_meta = None
        else:
            # The packed bytes and the statistics (references to bitsandbytes' tensors), no dense weight.
            quant = w4.tensors()
            ctx.save_for_backward(x2d if needs_dA else None, quant[0], lora_A, lora_B, xa, seed_tensor, bits,
                                  *quant[1:])
            ctx.weight_meta = w4.meta()
        ctx.weight_shape = (out_features, in_features)
        ctx.seed = None if seed_tensor is not None else seed
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y2d if x.dim() == 2 else y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, xa, seed, bits, *quant = ctx.saved_tensors
        if seed is None:
            seed = ctx.seed
        needs_dx, needs_dA, needs_dB = (ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                                        ctx.needs_input_grad[4])
        out_features, in_features = ctx.weight_shape
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, out_features)
        w4 = None if ctx.weight_meta is None else Weight4bit.from_parts((weight, *quant), ctx.weight_meta)
        if dy2d.shape[0] == 0 or dy2d.is_meta:
            dx = dy2d.new_zeros(ctx.x_shape, dtype=dy.dtype) if needs_dx else None
            dA = torch.zeros_like(lora_A) if needs_dA else None
            dB = torch.zeros_like(lora_B) if needs_dB else None
            return dx, None, None, dA, dB, None, None, None, None
        create_graph = False
        if torch.compiler.is_compiling():
            empty_bits = dy2d.new_empty((0,), dtype=torch.uint8)
            if w4 is None:
                dx, dA, dB = custom_ops.lora_backward(
                    dy2d, x2d, weight, lora_A, lora_B, xa, ctx.scaling, _seed_tensor(seed), ctx.dropout_p,
                    bits if bits is not None else empty_bits, needs_dx, needs_dA, needs_dB, ctx.backend)
            else:
                dx, dA, dB = custom_ops.lora_backward_4bit(
                    dy2d, x2d, *w4.tensors(), *w4.meta(), lora_A, lora_B, xa, ctx.scaling, _seed_tensor(seed),
                    ctx.dropout_p, bits if bits is not None else empty_bits, needs_dx, needs_dA, needs_dB,
                    ctx.backend)
        else:
            create_graph = torch.is_grad_enabled()
            with _no_autocast(dy2d.device), (torch.no_grad() if create_graph else contextlib.nullcontext()):
                if w4 is None:
                    dx, dA, dB = backend_ops(ctx.backend).lora_backward(
                        dy2d, x2d, weight, lora_A, lora_B, xa, ctx.scaling, seed, ctx.dropout_p, bits, needs_dx,
                        needs_dA, needs_dB)
                else:
                    dx, dA, dB = lora_backward_4bit(ctx.backend, dy2d, x2d, w4, lora_A, lora_B, xa, ctx.scaling,
                                                    seed, ctx.dropout_p, bits, needs_dx, needs_dA, needs_dB)
        dx = (dx if len(ctx.x_shape) == 2 else dx.view(ctx.x_shape)) if needs_dx else None
        dA, dB = (dA if needs_dA else None), (dB if needs_dB else None)
        if create_graph:
            if x2d is None and needs_dB and needs_dx:
                raise RuntimeError(f"{ONCE_DIFFERENTIABLE}; {UNSAVED_X}")
            dx, dA, dB = _once_differentiable((dx, dA, dB), (dy, x2d, lora_A, lora_B))
        return dx, None, None, dA, dB, None, None, None, None
