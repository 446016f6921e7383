"""Compute requirements of full fine-tuning against LoRA: parameter counts and memory.

Usage (also installed as the command ``fused-lora-memory``)::

    python -m fused_lora.memory --params 175e9 --dtype fp32
    python -m fused_lora.memory --shape 4096x4096 --shape 4096x1024 --r 16
    python -m fused_lora.memory --config mt0-large --target-modules q v --r 8
    python -m fused_lora.memory --config llama-3-8b --target-modules all-linear --r 16
    python -m fused_lora.memory --config path/to/config.json --target-modules q_proj v_proj --dtype bf16

A weight's shape is written in_features x out_features (``KxN``), as in the benchmark.

What is counted, per training setup (activations are not: they depend on batch and sequence):

* full fine-tuning: weights in ``dtype``, one gradient per weight in ``dtype``, Adam's two
  moments in fp32 (8 bytes per parameter), plus an fp32 master copy of the weights when
  ``dtype`` is fp16/bf16 (mixed-precision training);
* LoRA: the frozen weights in ``dtype``, the adapters in fp32 (PEFT's default), their
  gradients in fp32 and their Adam moments; a targeted weight of in_features x out_features
  adds ``r * (in_features + out_features)`` trainable parameters.

``--dtype nf4`` (or ``fp4``): the linear weights as bitsandbytes stores a 4-bit weight
(QLoRA), counted as it really is: the packed weights (half a byte each), one absmax per
block of 64 and, with double quantization (``Linear4bit``'s default), that absmax as one
byte plus an fp32 absmax per 256 of them: 0.5 + 1/64 + 4/16384 bytes per weight, 3.61 GB
for 7e9 weights (with ``--shape`` / ``--config`` also each layer's code books and offset).
Full fine-tuning of a 4-bit model is not possible (its weights are frozen bytes, with no
gradients): the report says so. With ``--config``, what bitsandbytes leaves unquantized
(embeddings, norms, biases, the output head) keeps its dtype (``--unquantized-dtype``,
default the config's ``torch_dtype``, else bf16).

``--config`` takes a transformers config: a JSON file, a name from ``KNOWN_CONFIGS`` (shipped
with the package in ``fused_lora/memory/configs/``, so no network is needed), or a model in the local
Hugging Face cache (never downloaded). The model is built on the meta device, so nothing is
allocated and only shapes are read. ``--params`` and ``--shape`` need neither torch nor
transformers, and do not import them.
"""

from __future__ import annotations

import argparse
import json
import numbers
import os
from dataclasses import dataclass

from .parameters import format_trainable_parameters

# bitsandbytes' 4-bit storage (Params4bit): blocks of 64 weights with one absmax each; with double
# quantization (Linear4bit's default) each absmax is one byte, with one fp32 absmax per 256 of them.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_BYTES_PER_PARAMETER = 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
QUANTIZED_4BIT = ("nf4", "fp4")
BYTES_PER_PARAMETER = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
                       "int8": 1, "int4": 0.5, "nf4": NF4_BYTES_PER_PARAMETER, "fp4": NF4_BYTES_PER_PARAMETER}
HALF_DTYPES = ("fp16", "float16", "bf16", "bfloat16")
UNQUANTIZED_DTYPES = ("fp32", "fp16", "bf16")
FULL_FINETUNING_4BIT = ("not possible: a 4-bit model's weights are frozen bitsandbytes bytes, with no gradients "
                        "and no optimizer states; train adapters on it (QLoRA) instead")
ADAM_BYTES_PER_PARAMETER = 8  # two fp32 moments
ADAPTER_BYTES_PER_PARAMETER = 4  # adapters kept in fp32
GB = 10 ** 9
GIB = 2 ** 30

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Offline configs shipped in CONFIG_DIR (<name>.json), with the other names each answers to
# (case-insensitive): the Hugging Face hub names of the checkpoints they describe.
KNOWN_CONFIGS = {
    "mt0-large": ("bigscience/mt0-large",),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b", "Llama-2-7b-hf"),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", "Meta-Llama-3-8B"),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "Mistral-7B-v0.1"),
    "gpt-3-175b": ("gpt-3", "gpt3", "gpt3-175b", "gpt-3-175B"),
}
_ALIASES = {alias.lower(): name for name, aliases in KNOWN_CONFIGS.items() for alias in (name,) + aliases}


def _check_count(name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r!r}")
    return int(r)


def _check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype.lower() not in BYTES_PER_PARAMETER:
        raise ValueError(f"dtype: expected one of {sorted(BYTES_PER_PARAMETER)}, got {dtype!r}")
    return dtype.lower()


def weight_bytes(num_params: int, dtype: str = "fp32") -> float:
    """Bytes of ``num_params`` weights stored in ``dtype`` (fp32 4, fp16/bf16 2, int8 1, int4 0.5;
    nf4/fp4 bitsandbytes' 0.5 + 1/64 + 4/16384, double quantization included)."""
    return _check_count("num_params", num_params) * BYTES_PER_PARAMETER[_check_dtype(dtype)]


def bnb_4bit_bytes(in_features: int, out_features: int, double_quant: bool = True,
                   blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes of one in_features x out_features weight stored by bitsandbytes in 4 bits (a ``Params4bit``
    and its QuantState): packed weights, the absmax per block and its code book; with double
    quantization the absmax in one byte each, the fp32 absmax per 256 of them, their code book
    and the offset."""
    numel = _check_count("in_features", in_features) * _check_count("out_features", out_features)
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4  # packed nibbles, the 16-entry fp32 code book
    if double_quant:
        return total + blocks + -(-blocks // NF4_NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4
    return total + blocks * 4


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters LoRA adds to one in_features x out_features weight: ``r * (in + out)``."""
    in_features = _check_count("in_features", in_features)
    out_features = _check_count("out_features", out_features)
    return _check_rank(r) * (in_features + out_features)


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
    """Every weight trained with Adam: weights + gradients in ``dtype``, fp32 moments (and master weights).

    A ValueError for a 4-bit ``dtype`` (nf4, fp4): a 4-bit model cannot be fully fine-tuned.
    """
    num_params, dtype = _check_count("num_params", num_params), _check_dtype(dtype)
    if dtype in QUANTIZED_4BIT:
        raise ValueError(f"dtype: full fine-tuning of a {dtype} model is {FULL_FINETUNING_4BIT}")
    per = BYTES_PER_PARAMETER[dtype]
    master = 4 * num_params if dtype in HALF_DTYPES else 0
    return MemoryEstimate(num_params, num_params * per, num_params * per,
                          num_params * ADAM_BYTES_PER_PARAMETER, master)


def lora_finetuning_memory(num_params: int, lora_params: int, dtype: str = "fp32",
                           frozen_bytes: float | None = None) -> MemoryEstimate:
    """Frozen weights in ``dtype`` (or ``frozen_bytes`` of them, counted layer by layer); fp32 adapters with
    fp32 gradients and Adam moments."""
    num_params, dtype = _check_count("num_params", num_params), _check_dtype(dtype)
    lora_params = _check_count("lora_params", lora_params)
    frozen = num_params * BYTES_PER_PARAMETER[dtype] if frozen_bytes is None else frozen_bytes
    return MemoryEstimate(lora_params, frozen + lora_params * ADAPTER_BYTES_PER_PARAMETER,
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

def known_config(name: str) -> dict:
    """The values of a shipped offline config (``KNOWN_CONFIGS``, or a name it answers to)."""
    key = _ALIASES.get(name.lower()) if isinstance(name, str) else None
    if key is None:
        raise ValueError(f"config: {name!r} is not a known name; known: {', '.join(KNOWN_CONFIGS)}")
    with open(os.path.join(CONFIG_DIR, key + ".json"), encoding="utf-8") as handle:
        values = json.load(handle)
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _config_values(config) -> dict | None:
    """The raw values of ``config`` (None for a transformers config object, used as it is)."""
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            return json.load(handle)
    if isinstance(config, str) and config.lower() in _ALIASES:
        return known_config(config)
    if isinstance(config, str):
        import transformers

        try:
            values, _ = transformers.PretrainedConfig.get_config_dict(config, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"config: {config!r} is neither a JSON file, a known name ({', '.join(KNOWN_CONFIGS)}), "
                             f"nor a model in the local Hugging Face cache (nothing is downloaded)") from error
        return dict(values)
    if type(config).__module__.split(".")[0] == "transformers" and hasattr(config, "to_dict"):
        return None
    raise TypeError(f"config: expected a transformers config, a dict, a JSON file or a name, "
                    f"got {type(config).__name__}")


def load_config(config):
    """A transformers config from a config object, a dict, a JSON file, or a known / locally cached name."""
    import transformers

    values = _config_values(config)
    if values is None:
        return config
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("config: the configuration has no 'model_type'")
    return transformers.AutoConfig.for_model(model_type, **values)


def _untie_output_embeddings(model) -> None:
    """Give the output layer its own weight where the checkpoint has one.

    NOTE: transformers 5 ties MT5's embeddings whatever the config says, but mt0-large's
    checkpoint (``tie_word_embeddings: false``) holds a separate lm_head: without this the
    count misses its 256M parameters.
    """
    import torch.nn as nn

    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or output.weight is not inputs.weight:
        return
    output.weight = nn.Parameter(inputs.weight.new_empty(inputs.weight.shape, device="meta"),
                                 requires_grad=inputs.weight.requires_grad)


def model_from_config(config):
    """The model for ``config`` (with its LM head) built on the meta device: shapes only, no memory.

    Embeddings are tied or not as the config's ``tie_word_embeddings`` says.
    """
    import torch
    import transformers

    values = _config_values(config)
    config = load_config(config if values is None else values)
    if getattr(config, "is_encoder_decoder", False):
        classes = (transformers.AutoModelForSeq2SeqLM, transformers.AutoModel)
    else:
        classes = (transformers.AutoModelForCausalLM, transformers.AutoModel)
    last_error = None
    for cls in classes:
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except ValueError as error:  # no such head for this architecture
            last_error = error
            continue
        if values is not None and values.get("tie_word_embeddings") is False:
            _untie_output_embeddings(model)
        return model
    raise ValueError(f"config: transformers has no model class for {type(config).__name__}") from last_error


def _linear_shape(module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D``; None otherwise."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return tuple(module.weight.shape)  # Conv1D keeps its weight as (in, out)
    return None


def linear_layer_names(model) -> list[str]:
    """The distinct last components of the names of the model's linear layers (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and _linear_shape(module) is not None})


def count_lora_parameters(model, target_modules, r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on the targeted linear layers (PEFT's target rules).

    The model is not changed. Raises ValueError when nothing matches (naming the model's
    linear layers) or when a matched module is not a linear layer.
    """
    from ..integrations.peft import ALL_LINEAR, _check_target_modules, _output_layer_name, matches_target

    r = _check_rank(r)
    targets = _check_target_modules(target_modules)
    modules = [(name, module) for name, module in model.named_modules() if name]
    if targets == ALL_LINEAR:
        output = _output_layer_name(model)
        chosen = [(n, m) for n, m in modules if _linear_shape(m) is not None and n != output]
    else:
        chosen = [(n, m) for n, m in modules if matches_target(targets, n)]
    if not chosen:
        raise ValueError(f"target_modules: {target_modules!r} matched no module of the model; its linear "
                         f"layers are named: {', '.join(linear_layer_names(model))}")
    total = 0
    for name, module in chosen:
        shape = _linear_shape(module)
        if shape is None:
            raise ValueError(f"target_modules: module {name!r} is a {type(module).__name__}, not a linear "
                             f"layer; linear layers are named: {', '.join(linear_layer_names(model))}")
        total += r * sum(shape)
    return total


def count_model_parameters(model) -> int:
    """Every parameter, each shared tensor once (as PEFT and ``model.parameters()`` count them)."""
    return sum(param.numel() for param in model.parameters())


def quantized_4bit_bytes(model, unquantized_dtype: str = "bf16", double_quant: bool = True) -> tuple[float, int]:
    """(bytes, quantized weights) of ``model`` loaded in 4 bits as transformers' bitsandbytes
    integration does: every linear layer's weight but the output layer's in bitsandbytes' 4-bit
    storage (``bnb_4bit_bytes``), every other parameter (embeddings, norms, biases, the output
    head) in ``unquantized_dtype``."""
    from ..integrations.peft import _output_layer_name

    per = BYTES_PER_PARAMETER[_check_dtype(unquantized_dtype)]
    output = _output_layer_name(model)
    quantized_ids, total, quantized = set(), 0.0, 0
    for name, module in model.named_modules():
        shape = _linear_shape(module) if name and name != output else None
        if shape is None or id(module.weight) in quantized_ids:
            continue
        quantized_ids.add(id(module.weight))
        total += bnb_4bit_bytes(*shape, double_quant=double_quant)
        quantized += shape[0] * shape[1]
    others = sum(param.numel() for param in model.parameters() if id(param) not in quantized_ids)
    return total + others * per, quantized


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
        in_features, out_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected INxOUT (in_features x out_features) such as "
                                         f"4096x1024, got {text!r}") from None
    if in_features < 1 or out_features < 1:
        raise argparse.ArgumentTypeError(f"--shape: dimensions must be >= 1, got {text!r}")
    return in_features, out_features


def _parse_count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--params: expected a number such as 7e9, got {text!r}") from None
    if value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"--params: expected a whole number >= 1, got {text!r}")
    return int(value)


def report(num_params: int, lora_params: int | None, dtype: str, r: int | None, what: str,
           frozen_bytes: float | None = None, frozen_note: str | None = None) -> str:
    """The text the command prints. ``frozen_bytes``: the weights' bytes when counted layer by layer
    (4-bit storage); ``frozen_note``: what they hold, for the header line."""
    lines = [f"{what}: {num_params:,d} parameters, weights in {frozen_note or dtype}"]
    lines.append("")
    if dtype in QUANTIZED_4BIT:
        weights = num_params * BYTES_PER_PARAMETER[dtype] if frozen_bytes is None else frozen_bytes
        lines.append(f"  {'weights':<36}{format_bytes(weights)}")
        lines.append("")
        lines.append(f"full fine-tuning: {FULL_FINETUNING_4BIT}")
    else:
        full = full_finetuning_memory(num_params, dtype)
        rows = [("weights", full.weights), ("gradients", full.gradients),
                ("Adam states (fp32 m, v)", full.optimizer_states)]
        if full.master_weights:
            rows.append(("fp32 master weights", full.master_weights))
        rows.append(("total (no activations)", full.total))
        lines.append(f"full fine-tuning: {num_params:,d} trainable parameters")
        lines += [f"  {name:<36}{format_bytes(value)}" for name, value in rows]
    if lora_params is not None:
        lora = lora_finetuning_memory(num_params, lora_params, dtype, frozen_bytes)
        lines.append("")
        lines.append(f"LoRA r={r}: {lora_params:,d} trainable parameters against {num_params:,d} "
                     f"({percent_fewer(lora_params, num_params)}% fewer)")
        lines += [f"  {name:<36}{format_bytes(value)}" for name, value in (
            (f"weights ({dtype}) + adapters (fp32)", lora.weights), ("gradients (adapters)", lora.gradients),
            ("Adam states (adapters)", lora.optimizer_states), ("total (no activations)", lora.total))]
        lines.append(f"  PEFT's print_trainable_parameters(): "
                     f"{format_trainable_parameters(lora_params, num_params + lora_params)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-lora-memory", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", type=_parse_count,
                        help="number of parameters, e.g. 7e9 (full fine-tuning only: LoRA needs --shape or --config)")
    source.add_argument("--shape", type=_parse_shape, action="append",
                        help="a weight of INxOUT, in_features x out_features as in the benchmark (repeatable); "
                             "LoRA targets each of them")
    source.add_argument("--config", help="transformers config: JSON file, known name "
                                         f"({', '.join(KNOWN_CONFIGS)}, or their hub names) or locally cached model")
    parser.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(BYTES_PER_PARAMETER),
                        help="the weights' dtype; nf4 / fp4: bitsandbytes' 4-bit storage (QLoRA), double "
                             "quantization included")
    parser.add_argument("--unquantized-dtype", type=str.lower, choices=UNQUANTIZED_DTYPES,
                        help="with --config and --dtype nf4/fp4: the dtype of what stays unquantized (embeddings, "
                             "norms, biases, output head); default the config's torch_dtype, else bf16")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank (default 8) with --shape or --config")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="with --config: module names (PEFT's rules) that get LoRA, default q_proj v_proj "
                             "(or q v for T5-style models)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.r is not None and args.r < 1:
        parser.error(f"--r: expected an int >= 1, got {args.r}")
    if args.target_modules is not None and args.config is None:
        parser.error("--target-modules: needs --config (the module names come from the model)")
    if args.unquantized_dtype is not None and (args.config is None or args.dtype not in QUANTIZED_4BIT):
        parser.error("--unquantized-dtype: needs --config and --dtype nf4 or fp4 (what a 4-bit model leaves "
                     "unquantized)")
    if args.params is not None:
        if args.r is not None:
            parser.error("--r: the LoRA count needs the shapes of the targeted weights, which --params alone "
                         "does not give; add them with --shape INxOUT (repeatable) or use --config instead of --params")
        print(report(args.params, None, args.dtype, None, "model"))
        return 0
    r = 8 if args.r is None else args.r
    if args.shape:
        num_params = sum(in_features * out_features for in_features, out_features in args.shape)
        lora_params = sum(lora_parameter_count(in_features, out_features, r) for in_features, out_features in args.shape)
        shapes = ", ".join(f"{in_features}x{out_features}" for in_features, out_features in args.shape)
        frozen = None
        if args.dtype in QUANTIZED_4BIT:
            frozen = sum(bnb_4bit_bytes(in_features, out_features) for in_features, out_features in args.shape)
        print(report(num_params, lora_params, args.dtype, r, f"weights {shapes} (in x out)", frozen))
        return 0
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.exit(2, f"{parser.prog}: --config needs the transformers package (pip install transformers); "
                       f"--params and --shape work without it\n")
    try:
        model = model_from_config(args.config)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    targets = args.target_modules
    if targets is None:
        names = set(linear_layer_names(model))
        targets = ["q", "v"] if {"q", "v"} <= names else ["q_proj", "v_proj"]
    # NOTE: PEFT takes "all-linear" as a string only; on the command line it is one word.
    lora_targets = targets[0] if len(targets) == 1 and targets[0].lower() == "all-linear" else targets
    num_params = count_model_parameters(model)
    try:
        lora_params = count_lora_parameters(model, lora_targets, r)
    except ValueError as error:
        parser.error(str(error))
    frozen = note = None
    if args.dtype in QUANTIZED_4BIT:
        unquantized = args.unquantized_dtype or _config_dtype(args.config) or "bf16"
        frozen, quantized = quantized_4bit_bytes(model, unquantized)
        note = (f"{args.dtype} for {quantized:,d} (the linear layers but the output head), {unquantized} for the "
                f"other {num_params - quantized:,d}")
    print(report(num_params, lora_params, args.dtype, r,
                 f"{args.config} ({type(model).__name__}), LoRA on {' '.join(targets)}", frozen, note))
    return 0


def _config_dtype(config) -> str | None:
    """fp32 / fp16 / bf16 from a config's ``torch_dtype`` (or ``dtype``), or None."""
    try:
        values = _config_values(config)
    except (ValueError, TypeError, OSError):
        return None
    value = (values or {}).get("torch_dtype") or (values or {}).get("dtype")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(value).replace("torch.", ""))

