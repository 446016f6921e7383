"""Measure what a forward pass saves for backward (the memory contract of DESIGN.md)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn()``.

    Tensors sharing a storage with one of ``exclude`` (typically the module's
    parameters) are not counted; a storage saved several times counts once.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in excluded:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
