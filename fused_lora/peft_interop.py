"""Put FusedLoRALinear into existing models: ``apply_lora`` (a plain model) and ``from_peft`` (a PEFT model).

``apply_lora`` picks the layers with PEFT's ``target_modules`` rules:

* a list (or set) of names: a module is targeted when its qualified name equals
  one of them or ends with ``"." + name`` (``["q_proj", "v_proj"]``);
* a string: a regular expression that must match the whole qualified name
  (``re.fullmatch``), except ``"all-linear"``, which targets every linear layer but
  the model's output layer (``get_output_embeddings()``), as PEFT does.

``from_peft`` swaps each PEFT ``lora.Linear`` for a FusedLoRALinear that shares its
tensors (base weight and bias, lora_A and lora_B), so an optimizer built on the PEFT
model's parameters keeps working. Only what the fused layer computes exactly is
converted; everything else raises a ValueError naming the module and the feature.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Iterable

import torch
import torch.nn as nn

from .checks import SUPPORTED_DTYPES, check_dropout_p, check_rank
from .layer import FusedLoRALinear, lora_scaling

ALL_LINEAR = "all-linear"


def _check_target_modules(target_modules) -> str | frozenset[str]:
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules: expected a non-empty regex or list of names, got ''")
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({error})") from None
        return target_modules
    if isinstance(target_modules, Iterable) and not isinstance(target_modules, (bytes, dict)):
        names = list(target_modules)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"target_modules: expected a non-empty list of non-empty module names, "
                             f"got {target_modules!r}")
        return frozenset(names)
    raise TypeError(f"target_modules: expected a list of module names or a regex string, "
                    f"got {type(target_modules).__name__}")


def matches_target(target_modules, name: str) -> bool:
    """PEFT's rule: regex ``fullmatch`` for a string, exact name or ``.suffix`` for a list."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + target) for target in target_modules)


def _output_layer_name(model: nn.Module) -> str | None:
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return None
    try:
        output = get_output()
    except (AttributeError, NotImplementedError):
        return None
    if output is None:
        return None
    return next((name for name, module in model.named_modules() if module is output), None)


def _is_quantised(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__module__.split(".")[0] in ("bitsandbytes", "hqq", "awq", "auto_gptq", "optimum")
            or not isinstance(weight, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES
            or type(weight).__name__ in ("Params4bit", "Int8Params"))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by FusedLoRALinear, freeze everything else; returns ``model``.

    The new layers reuse (and freeze) the linear layers' weight and bias tensors;
    ``lora_A`` and ``lora_B`` are the only trainable parameters afterwards (A
    kaiming-uniform, B zeros, so the model computes what it did before).
    Raises ValueError when nothing matches (listing the module names seen), or when a
    matched module is not a plain floating-point ``nn.Linear``; then the model is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    r = check_rank(r)
    lora_dropout = check_dropout_p(lora_dropout, "lora_dropout")
    lora_scaling(r, lora_alpha, use_rslora)  # checks lora_alpha
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora: expected a bool, got {type(use_rslora).__name__}")
    chosen = targeted_linears(model, target_modules)
    replace_linears(model, chosen, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    return model


def targeted_linears(model: nn.Module, target_modules) -> list[str]:
    """The qualified names of the ``nn.Linear`` layers ``target_modules`` picks; the model is not touched.

    Raises ValueError when nothing matches, or when a matched module is not a plain
    floating-point ``nn.Linear`` (or already is a FusedLoRALinear).
    """
    targets = _check_target_modules(target_modules)
    names = [name for name, _ in model.named_modules() if name]
    if targets == ALL_LINEAR:
        output_name = _output_layer_name(model)
        chosen = [name for name in names if type(model.get_submodule(name)) is nn.Linear and name != output_name]
    else:
        chosen = [name for name in names if matches_target(targets, name)]
    if not chosen:
        seen = ", ".join(names) if len(names) <= 60 else ", ".join(names[:60]) + f", ... ({len(names)} in all)"
        raise ValueError(f"target_modules: {target_modules!r} matched no module of the model; "
                         f"module names seen: {seen}")
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, FusedLoRALinear):
            raise ValueError(f"target_modules: module {name!r} already is a FusedLoRALinear")
        if not isinstance(module, nn.Linear) or _is_quantised(module):
            raise ValueError(f"target_modules: module {name!r} is a {type(module).__name__}; fused_lora "
                             f"supports only torch.nn.Linear with a floating-point weight")
    return chosen


def replace_linears(model: nn.Module, chosen: list[str], r: int, lora_alpha: float, lora_dropout: float,
                    use_rslora: bool) -> None:
    """Freeze every parameter of ``model``, then swap the linear layers named in ``chosen`` (checked) for FusedLoRALinear."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        linear = model.get_submodule(name)
        layer = FusedLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            use_rslora=use_rslora)
        layer.train(linear.training)
        _replace_module(model, name, layer)


def _peft_lora_layer_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError as error:
        raise ImportError("from_peft needs the peft package (pip install peft)") from error
    return LoraLayer, PeftLoraLinear


def _only_adapter(name: str, module) -> str:
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"from_peft: module {name!r} has {len(active)} active adapters {active}; fused_lora "
                         f"supports one (call set_adapter / delete_adapter first)")
    loaded = list(module.lora_A.keys())
    if len(loaded) != 1:
        raise ValueError(f"from_peft: module {name!r} holds several adapters {loaded}; fused_lora supports one "
                         f"(delete the others with peft_model.delete_adapter first)")
    adapter = active[0]
    if adapter not in module.lora_A:
        raise ValueError(f"from_peft: module {name!r} has no weights for its active adapter {adapter!r}")
    return adapter


def _check_convertible(name: str, module, peft_linear_type) -> str:
    if type(module) is not peft_linear_type:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        kind = "a quantised base layer" if base is not None and _is_quantised(base) else "this layer type"
        raise ValueError(f"from_peft: module {name!r} is a {type(module).__module__}.{type(module).__name__} "
                         f"(base layer {type(base).__name__}); fused_lora does not support {kind}, "
                         f"only peft.tuners.lora.Linear over torch.nn.Linear")
    adapter = _only_adapter(name, module)
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError(f"from_peft: module {name!r} uses fan_in_fan_out=True (Conv1D-style weights); "
                         f"not supported by fused_lora")
    base = module.get_base_layer()
    if not isinstance(base, nn.Linear) or _is_quantised(base):
        raise ValueError(f"from_peft: module {name!r} has a base layer {type(base).__name__} with weight dtype "
                         f"{getattr(getattr(base, 'weight', None), 'dtype', None)}; fused_lora supports only "
                         f"unquantised torch.nn.Linear bases (quantised base layers are not supported)")
    if getattr(module, "use_dora", {}).get(adapter, False):
        raise ValueError(f"from_peft: module {name!r} uses DoRA (use_dora=True); not supported by fused_lora")
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(f"from_peft: module {name!r} uses the LoRA variant {type(variant).__name__}; "
                         f"fused_lora supports plain LoRA only")
    if getattr(module, "lora_bias", {}).get(adapter, False) or module.lora_B[adapter].bias is not None:
        raise ValueError(f"from_peft: module {name!r} uses lora_bias=True; not supported by fused_lora")
    if getattr(module, "merged", False) or getattr(module, "merged_adapters", []):
        raise ValueError(f"from_peft: module {name!r} has its adapter merged into the base weight; "
                         f"unmerge it first (peft_model.unmerge_adapter())")
    if getattr(module, "disable_adapters", False):
        raise ValueError(f"from_peft: module {name!r} has its adapters disabled; enable them first")
    dropout = module.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        raise ValueError(f"from_peft: module {name!r} uses a {type(dropout).__name__} as LoRA dropout; "
                         f"fused_lora supports nn.Dropout only")
    lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if lora_A.dtype != lora_B.dtype:
        raise ValueError(f"from_peft: module {name!r} has lora_A in {lora_A.dtype} but lora_B in {lora_B.dtype}")
    return adapter


def _fused_from_peft_linear(module, adapter: str) -> FusedLoRALinear:
    base = module.get_base_layer()
    r = module.r[adapter]
    lora_alpha = module.lora_alpha[adapter]
    use_rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
    dropout = module.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    layer = FusedLoRALinear(base.in_features, base.out_features, r=r, lora_alpha=lora_alpha, lora_dropout=p,
                            bias=base.bias is not None, use_rslora=use_rslora, device="meta",
                            dtype=base.weight.dtype)
    # NOTE: the same Parameter objects, so optimizers and references to them stay valid.
    layer.weight = base.weight
    if base.bias is not None:
        layer.bias = base.bias
    layer.lora_A = module.lora_A[adapter].weight
    layer.lora_B = module.lora_B[adapter].weight
    scaling = module.scaling[adapter]
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.item()
    if not isinstance(scaling, numbers.Real) or not math.isfinite(float(scaling)):
        raise ValueError(f"from_peft: scaling {scaling!r} of adapter {adapter!r} is not a finite number")
    layer.scaling = float(scaling)  # PEFT's value, also after scale_layer()
    layer.train(module.training)
    return layer


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace every PEFT LoRA ``Linear`` in ``peft_model`` by a FusedLoRALinear, in place; returns it.

    Same tensors, scaling (rsLoRA included) and dropout probability. All modules are
    checked before any is replaced, so an unsupported one leaves the model unchanged.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model: expected a torch.nn.Module, got {type(peft_model).__name__}")
    lora_layer_type, peft_linear_type = _peft_lora_layer_types()
    found = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, lora_layer_type)]
    if not found:
        raise ValueError("peft_model: found no PEFT LoRA layer in the model")
    adapters = [(name, module, _check_convertible(name, module, peft_linear_type)) for name, module in found]
    for name, module, adapter in adapters:
        _replace_module(peft_model, name, _fused_from_peft_linear(module, adapter))
    return peft_model


def lora_layers(model: nn.Module) -> list[tuple[str, FusedLoRALinear]]:
    """The (qualified name, layer) pairs of every FusedLoRALinear in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FusedLoRALinear)]
