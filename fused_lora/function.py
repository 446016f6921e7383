"""The autograd Function: the only place where autograd lives.

Forward and backward call the backend operations through their custom-op
registrations (``fused_lora.custom_ops``), so torch.compile traces this Function
into one graph with the ops as opaque nodes.

Saved for backward: x (a reference to the caller's tensor, no copy; only when
lora_A needs a gradient), xa = D(x) A^T of shape (T, r) in fp32 (fp64 for fp64
inputs), and the seed as a 0-d int64 tensor. Never the mask, never D(x):
backward regenerates the mask from the seed.
"""

from __future__ import annotations

import torch

from . import custom_ops


def seed_tensor(seed) -> torch.Tensor:
    """The seed as the ops take it: a 0-d int64 CPU tensor (an int is converted)."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64)


class FusedLoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * (D(x) A^T) B^T`` with gradients for x, lora_A and lora_B only.

    ``seed``: an int in [0, 2**63) or a 0-d int64 CPU tensor holding one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                seed, backend: str):
        seed = seed_tensor(seed)
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        if x2d.shape[0] == 0:
            acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            xa = x2d.new_zeros((0, lora_A.shape[0]), dtype=acc_dtype)
            y2d = x2d.new_zeros((0, out_features))
        else:
            xa = custom_ops.lora_shrink(x2d, lora_A, seed, dropout_p, backend)
            y2d = custom_ops.lora_forward(x2d, weight, bias, lora_B, xa, scaling, backend)
        # NOTE: x is needed only for dA; skip the reference when lora_A is frozen.
        needs_dA = ctx.needs_input_grad[3]
        ctx.save_for_backward(x2d if needs_dA else None, weight, lora_A, lora_B, xa, seed)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        needs_dx, needs_dA, needs_dB = (ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                                        ctx.needs_input_grad[4])
        out_features, in_features = weight.shape
        dy2d = dy.reshape(-1, out_features)
        if dy2d.shape[0] == 0:
            dx = dy2d.new_zeros(ctx.x_shape) if needs_dx else None
            dA = torch.zeros_like(lora_A) if needs_dA else None
            dB = torch.zeros_like(lora_B) if needs_dB else None
        else:
            dx, dA, dB = custom_ops.lora_backward(
                dy2d, x2d, weight, lora_A, lora_B, xa, ctx.scaling, seed, ctx.dropout_p,
                needs_dx, needs_dA, needs_dB, ctx.backend)
            dx = dx.view(ctx.x_shape) if needs_dx else None
            dA = dA if needs_dA else None
            dB = dB if needs_dB else None
        return dx, None, None, dA, dB, None, None, None, None
