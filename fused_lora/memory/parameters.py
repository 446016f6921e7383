"""Counting parameters, and PEFT's ``print_trainable_parameters`` line."""

from __future__ import annotations


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared tensor counted once (as PEFT counts them).

    Works on meta-device models too (only shapes are read).
    """
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for _, param in model.named_parameters():
        count = param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def format_trainable_parameters(trainable: int, total: int) -> str:
    """PEFT's line: ``trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915``."""
    if total <= 0:
        raise ValueError("model: has no parameters")
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def trainable_parameters_line(model) -> str:
    """``format_trainable_parameters`` of ``model``'s counts."""
    return format_trainable_parameters(*count_parameters(model))


def print_trainable_parameters(model) -> None:
    """Print the trainable and total parameter counts in PEFT's exact format."""
    print(trainable_parameters_line(model))
