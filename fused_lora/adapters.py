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
import os

import torch
import torch.nn as nn

from .layer import FusedLoRALinear, lora_scaling
from .peft_interop import apply_lora, lora_layers, matches_target

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
    r = _shared_value(layers, "r")
    lora_alpha = _shared_value(layers, "lora_alpha")
    lora_dropout = _shared_value(layers, "lora_dropout")
    use_rslora = _shared_value(layers, "use_rslora")
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
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_adapter_config(directory) -> dict:
    """The LoRA config of an adapter directory, checked for what fused_lora supports."""
    directory = _check_directory(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"directory: {directory!r} has no {CONFIG_NAME}")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_NAME}: peft_type is {config.get('peft_type')!r}; fused_lora loads LORA only")
    for field, defaults in _UNSUPPORTED_CONFIG.items():
        value = config.get(field, defaults[0])
        if value not in defaults:
            raise ValueError(f"{CONFIG_NAME}: {field}={value!r} is not supported by fused_lora")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{CONFIG_NAME}: bias={config['bias']!r} is not supported (only 'none')")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{CONFIG_NAME}: missing {field!r}")
    return config


def read_adapter_weights(directory) -> dict[str, torch.Tensor]:
    directory = _check_directory(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file
        return load_file(path)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(f"directory: {directory!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``; returns ``model``.

    A model without FusedLoRALinear layers first gets them with ``apply_lora`` and the
    directory's config (target_modules, r, lora_alpha, lora_dropout, use_rslora). A model
    that has them must match the config (r, scaling); its lora_dropout is set to the
    config's. Missing or unexpected keys and shape mismatches are errors naming the key.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory)
    use_rslora = bool(config.get("use_rslora", False))
    lora_dropout = float(config.get("lora_dropout", 0.0))
    root, layers = _relative_layers(model)
    if not layers:
        apply_lora(root, config["target_modules"], r=config["r"], lora_alpha=config["lora_alpha"],
                   lora_dropout=lora_dropout, use_rslora=use_rslora)
        layers = lora_layers(root)
    expected_scaling = lora_scaling(config["r"], config["lora_alpha"], use_rslora)

    updates = []
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"model: layer {name!r} is merged; unmerge() it before loading an adapter")
        if layer.r != config["r"]:
            raise ValueError(f"model: layer {name!r} has r={layer.r} but {CONFIG_NAME} has r={config['r']}")
        if layer.scaling != expected_scaling:
            raise ValueError(f"model: layer {name!r} has scaling {layer.scaling} but {CONFIG_NAME} gives "
                             f"{expected_scaling} (lora_alpha={config['lora_alpha']}, use_rslora={use_rslora})")
        for param_name in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{param_name}.weight"
            if key not in tensors:
                raise ValueError(f"{WEIGHTS_NAME}: missing key {key!r} for layer {name!r}")
            param, value = getattr(layer, param_name), tensors[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{WEIGHTS_NAME}: key {key!r} has shape {tuple(value.shape)}, "
                                 f"layer {name!r} expects {tuple(param.shape)}")
            updates.append((param, value))
    used = {f"{PEFT_PREFIX}{name}.{p}.weight" for name, _ in layers for p in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{WEIGHTS_NAME}: unexpected key {unexpected[0]!r} (no FusedLoRALinear in the model "
                         f"for it; {len(unexpected)} unexpected in all)")
    with torch.no_grad():
        for param, value in updates:
            param.copy_(value)
    for _, layer in layers:
        layer.lora_dropout = lora_dropout
    return model
