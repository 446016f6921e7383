"""Counting parameters, and PEFT's ``print_trainable_parameters`` line."""

from __future__ import annotations

import torch.nn as nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once (as PEFT counts them).

    Works on meta-device models too (only shapes are read).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for _, param in model.named_parameters():
        count = param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """``trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915``."""
    trainable, total = count_parameters(model)
    if total == 0:
        raise ValueError("model: has no parameters")
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable and total parameter counts in PEFT's exact format."""
    print(trainable_parameters_line(model))
