"""Adapter files in PEFT's on-disk format: ``save_adapter`` and ``load_adapter``.

A directory holds

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``base_model.model.<module>.lora_B.weight`` (out, r) for every adapted linear layer,
  ``<module>`` being its qualified name in the plain model (PEFT's key names);
* ``adapter_config.json``: a PEFT ``LoraConfig`` (peft_type LORA, r, lora_alpha,
  lora_dropout, target_modules, use_rslora, bias "none", ...).

So ``peft.PeftModel.from_pretrained(model, directory)`` loads what we save, and
``load_adapter`` loads what PEFT saves (older ``adapter_model.bin`` files too).
"""

from __future__ import annotations

import json
import numbers
import os

import torch
import torch.nn as nn

from ..checks import SUPPORTED_DTYPES, is_finite_real, plain_number
from ..layer import FusedLoRALinear, adapter_dtypes, base_dtype_of, lora_scaling
from .peft import lora_layers, matches_target, replace_linears, targeted_linears

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# Config fields whose non-default value asks for something a FusedLoRALinear does not compute.
_UNSUPPORTED_CONFIG = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "modules_to_save": (None, []),
    "layers_to_transform": (None, []), "layer_replication": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []), "exclude_modules": (None, [], ""),
    "use_qalora": (False, None), "use_bdlora": (None, False), "alora_invocation_tokens": (None, []),
}


def _check_directory(directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    return os.fspath(directory)


def _model_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix of the plain model's names, the plain model): a PEFT model's wrapped model, or ``model``."""
    if hasattr(model, "peft_config") and isinstance(getattr(model, "base_model", None), nn.Module):
        inner = getattr(model.base_model, "model", None)
        if isinstance(inner, nn.Module):
            return PEFT_PREFIX, inner
    return "", model


def _relative_layers(model: nn.Module) -> tuple[nn.Module, list[tuple[str, FusedLoRALinear]]]:
    _, root = _model_root(model)
    return root, lora_layers(root)


def _shared_value(layers, field: str):
    first_name, first = layers[0]
    value = getattr(first, field)
    for name, layer in layers[1:]:
        if getattr(layer, field) != value:
            raise ValueError(f"model: layer {name!r} has {field}={getattr(layer, field)!r} but {first_name!r} has "
                             f"{value!r}; save_adapter writes one LoraConfig, so all layers must agree")
    return value


def _target_modules(root: nn.Module, names: list[str]) -> list[str]:
    """Short suffixes (``["q_proj", "v_proj"]``) when they pick exactly our layers, else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    picked = {name for name, module in root.named_modules()
              if name and isinstance(module, (nn.Linear, FusedLoRALinear)) and matches_target(frozenset(suffixes), name)}
    return suffixes if picked == set(names) else sorted(names)


def save_adapter(model: nn.Module, directory, *, task_type: str | None = None) -> None:
    """Write ``model``'s adapters (every FusedLoRALinear) to ``directory`` in PEFT's format.

    ``model`` is the model that was passed to ``apply_lora`` or ``from_peft``. All layers
    must share r, lora_alpha, lora_dropout and use_rslora (one LoraConfig).
    ``task_type`` (e.g. "CAUSAL_LM") is written to the config for PEFT's model classes.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    directory = _check_directory(directory)
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type: expected None or a str such as 'CAUSAL_LM', got {type(task_type).__name__}")
    root, layers = _relative_layers(model)
    if not layers:
        raise ValueError("model: has no FusedLoRALinear layer (use apply_lora or from_peft first)")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before saving the adapter")
    # NOTE: plain Python values for JSON (a numpy scalar, e.g. a PEFT lora_alpha, is not serialisable).
    r = int(_shared_value(layers, "r"))
    lora_alpha = plain_number(_shared_value(layers, "lora_alpha"))
    lora_dropout = float(_shared_value(layers, "lora_dropout"))
    use_rslora = bool(_shared_value(layers, "use_rslora"))
    for name, layer in layers:
        if layer.scaling != lora_scaling(r, lora_alpha, use_rslora):
            raise ValueError(f"model: layer {name!r} has scaling {layer.scaling}, not lora_alpha / "
                             f"{'sqrt(r)' if use_rslora else 'r'} = {lora_scaling(r, lora_alpha, use_rslora)}; "
                             f"PEFT's config cannot express it")

    tensors = {}
    for name, layer in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous().clone()
    model_config = getattr(root, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _target_modules(root, [name for name, _ in layers]),
        "exclude_modules": None,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    # NOTE: the JSON text first: an error there must not leave a half-written directory.
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
        handle.write(config_text)


def _config_error(path: str, field: str, expected: str, value) -> ValueError:
    return ValueError(f"{path}: field {field!r}: expected {expected}, got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_adapter_config(directory) -> dict:
    """The LoRA config of an adapter directory, checked for what fused_lora supports.

    Every field fused_lora uses is validated (r an int >= 1, lora_alpha a finite number,
    lora_dropout in [0, 1), use_rslora a bool, target_modules names or a regex, a
    scaling in range); every error is a ValueError naming the file and the field. The
    returned dict holds those fields with their defaults filled in.
    """
    directory = _check_directory(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"directory: {directory!r} has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno}, "
                         f"column {error.colno}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a LoraConfig), got a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: field 'peft_type' is {config.get('peft_type')!r}; fused_lora loads LORA only")
    for field, defaults in _UNSUPPORTED_CONFIG.items():
        value = config.get(field, defaults[0])
        if value not in defaults:
            raise ValueError(f"{path}: field {field!r}: {field}={value!r} is not supported by fused_lora")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: field 'bias': bias={config['bias']!r} is not supported (only 'none')")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{path}: missing field {field!r}")

    r = config["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _config_error(path, "r", "an int >= 1", r)
    lora_alpha = config["lora_alpha"]
    if not is_finite_real(lora_alpha):
        raise _config_error(path, "lora_alpha", "a finite number", lora_alpha)
    lora_dropout = config.get("lora_dropout", 0.0)
    if lora_dropout is None:
        lora_dropout = 0.0
    if not _real(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise _config_error(path, "lora_dropout", "a number in [0, 1)", lora_dropout)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _config_error(path, "use_rslora", "true or false", use_rslora)
    target_modules = config["target_modules"]
    if isinstance(target_modules, list):
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise _config_error(path, "target_modules", "a non-empty list of module names", target_modules)
    elif not isinstance(target_modules, str) or not target_modules:
        raise _config_error(path, "target_modules", "a list of module names or a regex string", target_modules)
    try:
        lora_scaling(r, lora_alpha, use_rslora)
    except ValueError as error:
        raise ValueError(f"{path}: fields 'lora_alpha' and 'r': {error}") from None
    return dict(config, r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=use_rslora,
                target_modules=target_modules)


def _weights_path(directory: str) -> str:
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"directory: {directory!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def read_adapter_weights(directory) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory: a dict of str to 2-D floating-point tensors.

    Errors (unreadable file, a value that is not a tensor, an integer tensor, a tensor
    that is not 2-D) are ValueErrors naming the file and the key.
    """
    path = _weights_path(_check_directory(directory))
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and OS errors alike: name the file
        raise ValueError(f"{path}: cannot be read: {type(error).__name__}: {error}") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got a {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: key {key!r}: expected a tensor under a str key, got {type(value).__name__}")
        if value.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{path}: key {key!r}: expected a float16, bfloat16, float32 or float64 tensor, "
                             f"got {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{path}: key {key!r}: expected a 2-D tensor, got shape {tuple(value.shape)}")
    return tensors


def _expected_adapters(root: nn.Module, layers, config: dict, config_path: str) -> list[tuple]:
    """(name, in_features, out_features, base dtype, adapter dtype or None for a layer still to be made)
    of every layer the adapter must fill; raises if the model cannot take it."""
    if not layers:
        try:
            chosen = targeted_linears(root, config["target_modules"])
        except ValueError as error:
            raise ValueError(f"{config_path}: field 'target_modules': {error}") from None
        linears = [(name, root.get_submodule(name)) for name in chosen]
        return [(name, linear.in_features, linear.out_features, base_dtype_of(linear), None) for name, linear in linears]
    expected_scaling = lora_scaling(config["r"], config["lora_alpha"], config["use_rslora"])
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before loading an adapter")
        if layer.r != config["r"]:
            raise ValueError(f"model: layer {name!r} has r={layer.r} but {CONFIG_NAME} has r={config['r']} "
                             f"({config_path}, field 'r')")
        if layer.scaling != expected_scaling:
            raise ValueError(f"model: layer {name!r} has scaling {layer.scaling} but {CONFIG_NAME} gives "
                             f"{expected_scaling} (lora_alpha={config['lora_alpha']}, "
                             f"use_rslora={config['use_rslora']}; {config_path})")
    return [(name, layer.in_features, layer.out_features, None, layer.lora_A.dtype) for name, layer in layers]


# dtype -> the dtypes that hold each of its values exactly (a wider mantissa and exponent range).
_EXACT_CASTS = {
    torch.float16: (torch.float16, torch.float32, torch.float64),
    torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
    torch.float32: (torch.float32, torch.float64),
    torch.float64: (torch.float64,),
}


def _new_adapter_dtype(file_dtypes: set, base_dtype: torch.dtype | None) -> torch.dtype:
    """The adapter dtype of a layer load_adapter makes: the file's, where the fused op takes it with
    this base (``adapter_dtypes``; None: a 4-bit base); else one that holds the file's values exactly;
    else PEFT's default (the values are then checked to survive the cast)."""
    allowed = adapter_dtypes(base_dtype)
    if len(file_dtypes) == 1 and next(iter(file_dtypes)) in allowed:
        return next(iter(file_dtypes))
    for dtype in allowed:
        if all(dtype in _EXACT_CASTS[d] for d in file_dtypes):
            return dtype
    return allowed[0]


def _rounded_count(value: torch.Tensor, dtype: torch.dtype) -> int:
    """How many elements of ``value`` change in a round trip through ``dtype`` (0: the cast is exact)."""
    if dtype in _EXACT_CASTS[value.dtype]:
        return 0
    back = value.to(dtype).to(value.dtype)
    same = (back == value) | (torch.isnan(back) & torch.isnan(value))
    return int((~same).sum())


def _check_tensors(tensors: dict, expected, r: int, weights_path: str) -> list[tuple[str, str, torch.Tensor]]:
    """(layer name, "lora_A" or "lora_B", value in the layer's adapter dtype) for every expected adapter;
    raises on a missing, misshapen or unexpected key, or a value the layer's dtype would round."""
    values = []
    for name, in_features, out_features, base_dtype, adapter_dtype in expected:
        pair = []
        for param_name, shape in (("lora_A", (r, in_features)), ("lora_B", (out_features, r))):
            key = f"{PEFT_PREFIX}{name}.{param_name}.weight"
            if key not in tensors:
                raise ValueError(f"{weights_path}: missing key {key!r} for layer {name!r}")
            value = tensors[key]
            if tuple(value.shape) != shape:
                raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, "
                                 f"layer {name!r} expects {shape}")
            pair.append((key, param_name, value))
        if adapter_dtype is None:
            adapter_dtype = _new_adapter_dtype({value.dtype for _, _, value in pair}, base_dtype)
        for key, param_name, value in pair:
            rounded = _rounded_count(value, adapter_dtype)
            if rounded:
                raise ValueError(f"{weights_path}: key {key!r} is {value.dtype} and layer {name!r} holds "
                                 f"{adapter_dtype} adapters: the cast would round {rounded} of its "
                                 f"{value.numel()} values (make the layers with adapter_dtype={value.dtype}, or "
                                 f"load into a model without FusedLoRALinear layers)")
            values.append((name, param_name, value.to(adapter_dtype)))
    used = {f"{PEFT_PREFIX}{entry[0]}.{p}.weight" for entry in expected for p in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected key {unexpected[0]!r} (no FusedLoRALinear in the model "
                         f"for it; {len(unexpected)} unexpected in all)")
    return values


class _Restore:
    """What load_adapter may change in a model, recorded so that a failure can put it back."""

    def __init__(self, root: nn.Module, layers):
        self.root = root
        self.modules = [(name, module) for name, module in root.named_modules() if name]
        self.requires_grad = [(param, param.requires_grad) for param in root.parameters()]
        self.layers = [(layer, layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.lora_dropout)
                       for _, layer in layers]

    def restore(self) -> None:
        for name, module in self.modules:
            parent_name, _, child = name.rpartition(".")
            parent = self.root.get_submodule(parent_name) if parent_name else self.root
            if getattr(parent, child, None) is not module:
                setattr(parent, child, module)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        with torch.no_grad():
            for layer, lora_A, lora_B, lora_dropout in self.layers:
                layer.lora_A.copy_(lora_A)
                layer.lora_B.copy_(lora_B)
                layer.lora_dropout = lora_dropout


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``; returns ``model``. All or nothing.

    A model without FusedLoRALinear layers gets them, as ``apply_lora`` with the
    directory's config (target_modules, r, lora_alpha, lora_dropout, use_rslora) would
    make them, with the file's adapter dtype where the fused op takes it with that base
    (PEFT saves fp32 adapters: fp32 on a bf16 model, as PEFT loads them), else a dtype that
    holds the file's values exactly (bf16 values on an fp32 base: fp32). A model that has
    them must match the config (r, scaling); their lora_dropout is set to the config's, and
    their adapters keep their dtype.

    The config and the tensors are read and checked against the model (names, shapes,
    dtypes, the config's values) before the model is touched. Dtypes: a tensor is never
    rounded; one whose values the layer's adapter dtype cannot hold exactly (fp32 values
    into bf16 adapters) is a ValueError naming the key. On any error the model
    is as before: the same module objects, requires_grad flags and values. Errors are
    ValueErrors naming the file and the field or key.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    directory = _check_directory(directory)
    config = read_adapter_config(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = _weights_path(directory)
    tensors = read_adapter_weights(directory)
    root, layers = _relative_layers(model)
    expected = _expected_adapters(root, layers, config, config_path)
    values = _check_tensors(tensors, expected, config["r"], weights_path)

    restore = _Restore(root, layers)
    try:
        if not layers:
            layer_dtypes = {name: value.dtype for name, _, value in values}
            replace_linears(root, [entry[0] for entry in expected], r=config["r"],
                            lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                            use_rslora=config["use_rslora"], adapter_dtype=layer_dtypes)
        _copy_values(dict(lora_layers(root)), values)
        for _, layer in lora_layers(root):
            layer.lora_dropout = config["lora_dropout"]
    except BaseException:
        restore.restore()
        raise
    return model


@torch.no_grad()
def _copy_values(layers: dict, values) -> None:
    """Copy each (layer name, "lora_A" or "lora_B", value) into the layer of that name: a
    FusedLoRALinear, or the active adapter of a module converted by from_peft."""
    for name, param_name, value in values:
        getattr(layers[name], param_name).copy_(value)
