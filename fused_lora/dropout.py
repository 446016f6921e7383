"""The public dropout mask and the seed of a call."""

from __future__ import annotations

import torch

from .ops.backends import backend_name_for, backend_ops
from .checks import MAX_SEED, check_dims, check_dropout_p, check_seed


def draw_seed(device="cpu") -> torch.Tensor:
    """A seed in [0, 2**63) from torch's default generator of ``device``, as a 0-d int64 tensor there.

    So ``torch.manual_seed`` makes runs repeatable, and activation checkpointing
    (which restores the CPU and CUDA RNG states) recomputes the same mask.
    NOTE: staying a tensor (no ``.item()``) keeps the draw inside a torch.compile
    graph, and on CUDA inside a captured CUDA graph: each replay draws anew (PyTorch
    advances the generator's offset per replay) and the kernels read the seed there.
    """
    return torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64, device=device)


def dropout_mask(seed: int, rows: int, cols: int, dropout_p: float, device="cpu") -> torch.Tensor:
    """The keep mask (True = kept) that every backend uses for ``seed`` on a ``(rows, cols)`` input.

    ``rows`` is T (the number of flattened input rows), ``cols`` is K
    (in_features). ``fused_lora_linear(..., seed=seed)`` drops exactly the
    elements where this mask is False, on every backend and device.
    """
    seed = check_seed(seed)
    rows, cols = check_dims(rows, cols)
    dropout_p = check_dropout_p(dropout_p)
    device = torch.device(device)
    if dropout_p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    name = backend_name_for(device)
    return backend_ops(name).keep_mask(seed, rows, cols, dropout_p, device)
