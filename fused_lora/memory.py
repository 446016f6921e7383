"""Compute requirements of full fine-tuning against LoRA: parameter counts and memory.

Usage (also installed as the command ``fused-lora-memory``)::

    python -m fused_lora.memory --params 175e9 --dtype fp32
    python -m fused_lora.memory --shape 100x100 --r 2
    python -m fused_lora.memory --config mt0-large --target-modules q v --r 8
    python -m fused_lora.memory --config path/to/config.json --target-modules q_proj v_proj --dtype bf16

What is counted, per training setup (activations are not: they depend on batch and sequence):

* full fine-tuning: weights in ``dtype``, one gradient per weight in ``dtype``, Adam's two
  moments in fp32 (8 bytes per parameter), plus an fp32 master copy of the weights when
  ``dtype`` is fp16/bf16 (mixed-precision training);
* LoRA: the frozen weights in ``dtype``, the adapters in fp32 (PEFT's default), their
  gradients in fp32 and their Adam moments; a targeted (d_out, d_in) weight adds
  ``r * (d_in + d_out)`` trainable parameters.

Models from a transformers config (a JSON file, a name in ``KNOWN_CONFIGS``, or a name in the
local Hugging Face cache; never downloaded) are built on the meta device, so nothing is
allocated and only shapes are read.
"""

from __future__ import annotations

import argparse
import copy
import json
import numbers
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

BYTES_PER_PARAMETER = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
                       "int8": 1, "int4": 0.5}
HALF_DTYPES = ("fp16", "float16", "bf16", "bfloat16")
ADAM_BYTES_PER_PARAMETER = 8  # two fp32 moments
ADAPTER_BYTES_PER_PARAMETER = 4  # adapters kept in fp32
GB = 10 ** 9
GIB = 2 ** 30

# Architecture values of public checkpoints, so that no download is needed.
KNOWN_CONFIGS = {
    # bigscience/mt0-large: the MT5-large architecture.
    "mt0-large": dict(model_type="mt5", d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                      num_decoder_layers=24, vocab_size=250112, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, is_encoder_decoder=True),
}


def _check_count(name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def _check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype.lower() not in BYTES_PER_PARAMETER:
        raise ValueError(f"dtype: expected one of {sorted(BYTES_PER_PARAMETER)}, got {dtype!r}")
    return dtype.lower()


def weight_bytes(num_params: int, dtype: str = "fp32") -> float:
    """Bytes of ``num_params`` weights stored in ``dtype`` (fp32 4, fp16/bf16 2, int8 1, int4 0.5)."""
    return _check_count("num_params", num_params) * BYTES_PER_PARAMETER[_check_dtype(dtype)]


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters LoRA adds to one (d_out, d_in) weight: ``r * (d_in + d_out)``."""
    d_in, d_out = _check_count("d_in", d_in), _check_count("d_out", d_out)
    r = _check_count("r", r)
    if r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r}")
    return r * (d_in + d_out)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to train, by component (no activations)."""

    trainable_params: int
    weights: float
    gradients: float
    optimizer_states: float
    master_weights: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.master_weights


def full_finetuning_memory(num_params: int, dtype: str = "fp32") -> MemoryEstimate:
    """Every weight trained with Adam: weights + gradients in ``dtype``, fp32 moments (and master weights)."""
    num_params, dtype = _check_count("num_params", num_params), _check_dtype(dtype)
    per = BYTES_PER_PARAMETER[dtype]
    master = 4 * num_params if dtype in HALF_DTYPES else 0
    return MemoryEstimate(num_params, num_params * per, num_params * per,
                          num_params * ADAM_BYTES_PER_PARAMETER, master)


def lora_finetuning_memory(num_params: int, lora_params: int, dtype: str = "fp32") -> MemoryEstimate:
    """Frozen weights in ``dtype``; fp32 adapters with fp32 gradients and Adam moments."""
    num_params, dtype = _check_count("num_params", num_params), _check_dtype(dtype)
    lora_params = _check_count("lora_params", lora_params)
    return MemoryEstimate(lora_params,
                          num_params * BYTES_PER_PARAMETER[dtype] + lora_params * ADAPTER_BYTES_PER_PARAMETER,
                          lora_params * ADAPTER_BYTES_PER_PARAMETER, lora_params * ADAM_BYTES_PER_PARAMETER, 0)


def percent_fewer(lora_params: int, full_params: int) -> str:
    """``"96"`` for 400 against 10,000: how many percent fewer trainable parameters LoRA has."""
    if full_params <= 0:
        raise ValueError(f"full_params: expected an int >= 1, got {full_params!r}")
    text = f"{100 * (1 - lora_params / full_params):.2f}"
    return text.rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------
# Models from transformers configs, on the meta device
# ---------------------------------------------------------------------------------------------

def load_config(config):
    """A transformers config from a config object, a dict, a JSON file, or a known / locally cached name."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            values = json.load(handle)
    elif isinstance(config, str) and config in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[config])
    elif isinstance(config, str) and config.split("/")[-1] in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[config.split("/")[-1]])
    elif isinstance(config, str):
        try:
            return transformers.AutoConfig.from_pretrained(config, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"config: {config!r} is neither a JSON file, a known name {sorted(KNOWN_CONFIGS)}, "
                             f"nor a model in the local Hugging Face cache (nothing is downloaded)") from error
    else:
        raise TypeError(f"config: expected a transformers config, a dict, a JSON file or a name, "
                        f"got {type(config).__name__}")
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("config: the configuration has no 'model_type'")
    return transformers.AutoConfig.for_model(model_type, **values)


def model_from_config(config) -> nn.Module:
    """The model for ``config`` (with its LM head) built on the meta device: shapes only, no memory."""
    import transformers

    config = load_config(config)
    if getattr(config, "is_encoder_decoder", False):
        classes = (transformers.AutoModelForSeq2SeqLM, transformers.AutoModel)
    else:
        classes = (transformers.AutoModelForCausalLM, transformers.AutoModel)
    last_error = None
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except ValueError as error:  # no such head for this architecture
            last_error = error
    raise ValueError(f"config: transformers has no model class for {type(config).__name__}") from last_error


def count_lora_parameters(model: nn.Module, target_modules, r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on the targeted linear layers (the model is not changed)."""
    from .peft_interop import apply_lora

    first = next(model.parameters(), None)
    model = copy.deepcopy(model)
    if first is not None and first.device.type != "meta":
        model = model.to("meta")
    apply_lora(model, target_modules, r=r)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    """``700.00 GB (651.93 GiB)``: decimal units, with the binary ones in parentheses."""
    for decimal, binary, power in (("GB", "GiB", 3), ("MB", "MiB", 2), ("kB", "KiB", 1)):
        if n >= 1000 ** power:
            return f"{n / 1000 ** power:,.2f} {decimal} ({n / 1024 ** power:,.2f} {binary})"
    return f"{n:,.0f} bytes"


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        d_out, d_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected OUTxIN such as 4096x4096, got {text!r}") from None
    if d_out < 1 or d_in < 1:
        raise argparse.ArgumentTypeError(f"--shape: dimensions must be >= 1, got {text!r}")
    return d_out, d_in


def _parse_count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--params: expected a number such as 7e9, got {text!r}") from None
    if value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"--params: expected a whole number >= 1, got {text!r}")
    return int(value)


def report(num_params: int, lora_params: int | None, dtype: str, r: int, what: str) -> str:
    """The text the command prints."""
    lines = [f"{what}: {num_params:,d} parameters, weights in {dtype}"]
    full = full_finetuning_memory(num_params, dtype)
    rows = [("weights", full.weights), ("gradients", full.gradients),
            ("Adam states (fp32 m, v)", full.optimizer_states)]
    if full.master_weights:
        rows.append(("fp32 master weights", full.master_weights))
    rows.append(("total (no activations)", full.total))
    lines.append("")
    lines.append(f"full fine-tuning: {num_params:,d} trainable parameters")
    lines += [f"  {name:<36}{format_bytes(value)}" for name, value in rows]
    if lora_params is not None:
        lora = lora_finetuning_memory(num_params, lora_params, dtype)
        lines.append("")
        lines.append(f"LoRA r={r}: {lora_params:,d} trainable parameters against {num_params:,d} "
                     f"({percent_fewer(lora_params, num_params)}% fewer)")
        lines += [f"  {name:<36}{format_bytes(value)}" for name, value in (
            (f"weights ({dtype}) + adapters (fp32)", lora.weights), ("gradients (adapters)", lora.gradients),
            ("Adam states (adapters)", lora.optimizer_states), ("total (no activations)", lora.total))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-lora-memory", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", type=_parse_count, help="number of parameters, e.g. 7e9")
    source.add_argument("--shape", type=_parse_shape, action="append",
                        help="a weight of OUTxIN (repeatable); LoRA targets each of them")
    source.add_argument("--config", help="transformers config: JSON file, known name "
                                         f"({', '.join(sorted(KNOWN_CONFIGS))}) or locally cached model name")
    parser.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(BYTES_PER_PARAMETER))
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="with --config: module names (PEFT's rules) that get LoRA, default q_proj v_proj "
                             "(or q v for T5-style models)")
    args = parser.parse_args(argv)
    if args.r < 1:
        parser.error(f"--r: expected an int >= 1, got {args.r}")

    if args.params is not None:
        print(report(args.params, None, args.dtype, args.r, "model"))
    elif args.shape:
        num_params = sum(d_out * d_in for d_out, d_in in args.shape)
        lora_params = sum(lora_parameter_count(d_in, d_out, args.r) for d_out, d_in in args.shape)
        shapes = ", ".join(f"{d_out}x{d_in}" for d_out, d_in in args.shape)
        print(report(num_params, lora_params, args.dtype, args.r, f"weights {shapes}"))
    else:
        try:
            model = model_from_config(args.config)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
        targets = args.target_modules
        if targets is None:
            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = ["q", "v"] if {"q", "v"} <= names else ["q_proj", "v_proj"]
        num_params = sum(p.numel() for p in model.parameters())
        try:
            lora_params = count_lora_parameters(model, targets, args.r)
        except ValueError as error:
            parser.error(str(error).split("; module names seen")[0])
        print(report(num_params, lora_params, args.dtype, args.r,
                     f"{args.config} ({type(model).__name__}), LoRA on {' '.join(targets)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
