"""Put FusedLoRALinear into existing models: ``apply_lora`` (a plain model) and ``from_peft`` (a PEFT model).

``apply_lora`` picks the layers with PEFT's ``target_modules`` rules:

* a list (or set) of names: a module is targeted when its qualified name equals
  one of them or ends with ``"." + name`` (``["q_proj", "v_proj"]``);
* a string: a regular expression that must match the whole qualified name
  (``re.fullmatch``), except ``"all-linear"``, which targets every linear layer but
  the model's output layer (``get_output_embeddings()``), as PEFT does.

``from_peft`` fuses what it can (``conversion_problem`` decides, per module; the rest stays
PEFT's, and a summary says what was fused and why not). It keeps PEFT's ``lora.Linear`` modules
and only changes their class to
``FusedPeftLinear``, a subclass whose ``forward`` calls ``fused_lora_linear`` while PEFT's
own forward would compute plain LoRA (one active adapter, not merged, adapters enabled,
no DoRA or other variant, a plain ``nn.Linear`` base, a frozen base, dtypes the fused op
takes) and calls PEFT's forward otherwise. Everything else stays PEFT's: the parameters
(same objects, same names), ``save_pretrained``, ``merge_and_unload``, ``unload``,
``disable_adapter()``, ``set_adapter``, ``add_adapter``, the parameter counts.
PEFT's LoRA layer over a bitsandbytes 4-bit base (``peft.tuners.lora.bnb.Linear4bit``, QLoRA)
becomes ``FusedPeftLinear4bit`` the same way: the fused op reads the ``Params4bit`` in place
(``fused_lora.quantized``) while it computes what PEFT's forward would (see ``fused_adapter``).
NOTE: swapping in our own module type instead would need every one of those PEFT
features re-implemented (and kept in step with PEFT); routing only the forward keeps
them PEFT's by construction, and the fallback keeps every other case exactly PEFT's.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from ..checks import HALF_DTYPES, SUPPORTED_DTYPES, check_dropout_p, check_rank, type_name
from ..functional import TRITON_MAX_RANK, fused_lora_linear
from ..layer import FusedLoRALinear, base_dtype_of, check_adapter_dtype, linear_problem, lora_scaling
from ..quantized import is_linear_4bit

ALL_LINEAR = "all-linear"
_LOGGER = logging.getLogger(__name__)


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


_QUANTISATION_PACKAGES = ("bitsandbytes", "hqq", "awq", "auto_gptq", "optimum")


def _has_quantised_weight(module: nn.Module) -> bool:
    """True for a module from a quantisation package, or whose tensor weight is quantised (a dtype
    fused_lora does not compute in, or bitsandbytes' parameter types)."""
    weight = getattr(module, "weight", None)
    return (type(module).__module__.split(".")[0] in _QUANTISATION_PACKAGES
            or isinstance(weight, torch.Tensor) and (weight.dtype not in SUPPORTED_DTYPES
                                                     or type(weight).__name__ in ("Params4bit", "Int8Params")))


def _is_quantised(module: nn.Module) -> bool:
    """``_has_quantised_weight``, or no tensor weight at all: nothing here can read it as a dense linear
    weight. (A MultiheadAttention, which has none, is not called quantised in messages.)"""
    return _has_quantised_weight(module) or not isinstance(getattr(module, "weight", None), torch.Tensor)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False, adapter_dtype=None) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by FusedLoRALinear, freeze everything else; returns ``model``.

    The new layers reuse (and freeze) the linear layers' weight and bias tensors;
    ``lora_A`` and ``lora_B`` are the only trainable parameters afterwards (A
    kaiming-uniform, B zeros, so the model computes what it did before).
    ``adapter_dtype``: None (PEFT's default: fp32 adapters on fp16/bf16 layers, else the
    layer's dtype), or a dtype the fused op takes (the layer's, or fp32 on fp16/bf16).

    Only linear layers that a FusedLoRALinear computes faithfully are replaced
    (``targeted_linears``): a named target with its own forward (an ``nn.Linear``
    subclass, a patched forward), hooks, a quantised weight, or whose parent reads its
    weight directly (``nn.MultiheadAttention.out_proj``) is a ValueError naming the module
    and the reason; ``"all-linear"`` skips such layers. Raises ValueError when nothing
    matches (listing the module names seen); on any error the model is unchanged.
    The one quantised layer taken: bitsandbytes' ``Linear4bit`` (QLoRA: NF4 or FP4, quantized,
    plain), whose 4-bit weight is used in place (``FusedLoRALinear.from_linear``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    r = check_rank(r)
    lora_dropout = check_dropout_p(lora_dropout, "lora_dropout")
    lora_scaling(r, lora_alpha, use_rslora)  # checks lora_alpha
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora: expected a bool, got {type_name(use_rslora)}")
    chosen = targeted_linears(model, target_modules)
    for name in chosen:  # checks adapter_dtype against every layer before anything changes
        check_adapter_dtype(adapter_dtype, base_dtype_of(model.get_submodule(name)))
    replace_linears(model, chosen, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    adapter_dtype=adapter_dtype)
    return model


# Parents that read a child linear's weight directly instead of calling the child: a FusedLoRALinear
# there would never run (its adapter would change no output and get no gradient).
# nn.TransformerEncoderLayer does so on its inference fast path (torch._transformer_encoder_layer_fwd).
WEIGHT_READ_BY_PARENT = ((nn.MultiheadAttention, ("out_proj",)),
                         (nn.TransformerEncoderLayer, ("linear1", "linear2")))


def replacement_problem(model: nn.Module, name: str) -> str | None:
    """None when ``apply_lora`` can replace the module ``name`` of ``model`` by a FusedLoRALinear
    that computes what it did; else why not (a phrase after the module's name)."""
    module = model.get_submodule(name)
    if isinstance(module, FusedLoRALinear):
        return "already is a FusedLoRALinear"
    problem = linear_problem(module)
    if problem is not None:
        return problem
    if _is_quantised(module) and not is_linear_4bit(module):
        return f"is a quantised {type(module).__module__}.{type(module).__name__} (not supported by fused_lora)"
    parent = _weight_reader(model, name, WEIGHT_READ_BY_PARENT)
    if parent is not None:
        child = name.rpartition(".")[2]
        return (f"is read directly by its parent {type(parent).__name__} (which uses {child}.weight, not "
                f"{child}'s forward): a FusedLoRALinear there would never run, and its adapter would get "
                f"no gradient")
    return None


def _weight_reader(model: nn.Module, name: str, table) -> nn.Module | None:
    """The parent of the module ``name`` of ``model`` when ``table`` (pairs of a parent class and its
    children's names, as WEIGHT_READ_BY_PARENT) says it reads that child's weight directly, else None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return next((parent for kind, children in table if isinstance(parent, kind) and child in children), None)


def targeted_linears(model: nn.Module, target_modules) -> list[str]:
    """The qualified names of the ``nn.Linear`` layers ``target_modules`` picks; the model is not touched.

    ``"all-linear"`` picks every ``torch.nn.Linear`` (the class itself, not subclasses, but
    bitsandbytes' ``Linear4bit``, whose 4-bit weight FusedLoRALinear reads in place) except
    the output layer, and of those only the ones a FusedLoRALinear can replace faithfully
    (``replacement_problem``: no hooks, no patched forward, a floating-point weight, not read
    directly by its parent such as ``nn.MultiheadAttention.out_proj``); the others are left as
    they are. Names and regexes must pick only such layers: raises ValueError when nothing
    matches, or naming a matched module that cannot be replaced, and why.
    """
    targets = _check_target_modules(target_modules)
    names = [name for name, _ in model.named_modules() if name]
    if targets == ALL_LINEAR:
        output_name = _output_layer_name(model)
        chosen = [name for name in names if name != output_name
                  and (type(model.get_submodule(name)) is nn.Linear or is_linear_4bit(model.get_submodule(name)))
                  and replacement_problem(model, name) is None]
    else:
        chosen = [name for name in names if matches_target(targets, name)]
    if not chosen:
        seen = ", ".join(names) if len(names) <= 60 else ", ".join(names[:60]) + f", ... ({len(names)} in all)"
        raise ValueError(f"target_modules: {target_modules!r} matched no module of the model; "
                         f"module names seen: {seen}")
    for name in chosen:
        problem = replacement_problem(model, name)
        if problem is not None:
            raise ValueError(f"target_modules: module {name!r} {problem}")
    return chosen


def replace_linears(model: nn.Module, chosen: list[str], r: int, lora_alpha: float, lora_dropout: float,
                    use_rslora: bool, adapter_dtype=None) -> None:
    """Freeze every parameter of ``model``, then swap the linear layers named in ``chosen`` (checked) for
    FusedLoRALinear. ``adapter_dtype``: None, a dtype, or a dict of name to dtype (None for a missing name)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        linear = model.get_submodule(name)
        dtype = adapter_dtype.get(name) if isinstance(adapter_dtype, dict) else adapter_dtype
        layer = FusedLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            use_rslora=use_rslora, adapter_dtype=dtype)
        layer.train(linear.training)
        _replace_module(model, name, layer)


def _peft_lora_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError as error:
        raise ImportError("from_peft needs the peft package (pip install peft)") from error
    return LoraLayer, PeftLoraLinear


# ---------------------------------------------------------------------------------------------
# When the fused op computes what PEFT's forward computes
# ---------------------------------------------------------------------------------------------

def _autocast_dtype(tensor: torch.Tensor | None, device_type: str):
    """The dtype ``tensor`` has inside the fused op: autocast casts floating tensors but fp64 (as F.linear)."""
    if tensor is None:
        return None
    if (device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
            and tensor.is_floating_point() and tensor.dtype != torch.float64):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` computing exactly ``F.linear``: no subclass forward, no patched forward, no hooks (the
    fused path never calls it, so its forward and backward hooks would not run)."""
    if type(module) is not nn.Linear and not (isinstance(module, nn.Linear)
                                              and type(module).forward is nn.Linear.forward):
        return False
    state = module.__dict__
    if ("forward" in state or state["_forward_hooks"] or state["_forward_pre_hooks"] or state["_backward_hooks"]
            or state["_backward_pre_hooks"]):
        return False
    weight = state["_parameters"].get("weight")
    if type(weight) is nn.Parameter and weight.dtype in SUPPORTED_DTYPES:
        return True  # NOTE: the common case, without _is_quantised's string tests (this runs every call)
    return not _is_quantised(module)


def _global_module_hooks() -> bool:
    """Forward or backward hooks registered for every module (they would run around PEFT's base and adapter
    calls)."""
    hooks = nn.modules.module
    return bool(getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None)
                or getattr(hooks, "_global_backward_hooks", None)
                or getattr(hooks, "_global_backward_pre_hooks", None))


def fused_adapter(module, x: torch.Tensor | None = None) -> tuple[str | None, str | None]:
    """``(adapter, None)`` when ``fused_lora_linear`` computes what PEFT's ``lora.Linear.forward`` would,
    else ``(None, reason)``: why PEFT's own forward runs instead.

    ``x`` (optional) adds the checks that depend on the input (dtype, device).
    """
    if module.disable_adapters:
        return None, "its adapters are disabled"
    if module.merged:
        return None, f"its adapters {module.merged_adapters} are merged into the base weight"
    present = [name for name in module.active_adapters if name in module._modules["lora_A"]]
    if len(present) != 1:
        return None, f"it has {len(present)} active adapters {present}"
    adapter = present[0]
    if adapter in module.lora_variant or module.use_dora.get(adapter, False):
        variant = module.lora_variant.get(adapter)
        return None, f"adapter {adapter!r} uses the LoRA variant {type(variant).__name__ if variant else 'DoRA'}"
    children = module._modules  # NOTE: direct lookups; nn.Module.__getattr__ is slow and this runs every call
    lora_A, lora_B = children["lora_A"][adapter], children["lora_B"][adapter]
    if not (_plain_linear(lora_A) and _plain_linear(lora_B)) or lora_A.bias is not None:
        return None, f"adapter {adapter!r} has lora_A / lora_B other than bias-free nn.Linear"
    if lora_B.bias is not None:
        return None, f"adapter {adapter!r} uses lora_bias=True"
    dropout = children["lora_dropout"][adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity) or vars(dropout).get("forward") is not None \
            or (type(dropout) is nn.Dropout and not 0.0 <= dropout.p < 1.0):
        return None, f"adapter {adapter!r} uses {dropout!r} as LoRA dropout (fused: nn.Dropout with p < 1)"
    if getattr(module, "fan_in_fan_out", False):
        return None, "it uses fan_in_fan_out=True"
    base = children["base_layer"]
    four_bit = type(module) is not _FUSED_PEFT_LINEAR and is_linear_4bit(base)
    if four_bit:
        reason = linear_problem(base)
        if reason is not None:
            return None, f"its base layer {reason}"
    elif not _plain_linear(base):
        return None, f"its base layer is a {type(base).__name__}, not a plain unquantised nn.Linear"
    if _global_module_hooks():
        return None, "global module hooks are registered"
    if torch.is_grad_enabled() and (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
        return None, "its base layer is trainable (fused_lora computes no gradient for it)"
    weight_A, weight_B = lora_A.weight, lora_B.weight
    if weight_A.dtype != weight_B.dtype:
        return None, f"adapter {adapter!r} has lora_A in {weight_A.dtype} but lora_B in {weight_B.dtype}"
    if x is None:
        return adapter, None
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != base.in_features:
        return None, "the input is not a (..., in_features) tensor"
    device_type = x.device.type
    x_dtype = _autocast_dtype(x, device_type)
    if four_bit:
        reason = _linear_4bit_dtype_reason(base, x, x_dtype)
        if reason is not None:
            return None, reason
    elif x_dtype not in SUPPORTED_DTYPES or _autocast_dtype(base.weight, device_type) != x_dtype \
            or _autocast_dtype(base.bias, device_type) not in (None, x_dtype):
        return None, f"the input ({x.dtype}) and the base layer ({base.weight.dtype}) differ in dtype"
    adapter_dtype = weight_A.dtype
    if adapter_dtype != torch.float32 and _autocast_dtype(weight_A, device_type) == x_dtype:
        adapter_dtype = x_dtype  # autocast casts non-fp32 adapters to x's dtype
    if not (adapter_dtype == x_dtype or (adapter_dtype == torch.float32 and x_dtype in HALF_DTYPES)):
        return None, f"adapters in {weight_A.dtype} with an input in {x.dtype} (fused: x's dtype, or fp32 for fp16/bf16)"
    devices = {x.device, base.weight.device, weight_A.device, weight_B.device}
    if len(devices) != 1:
        return None, f"tensors on several devices {sorted(map(str, devices))}"
    if x.device.type == "cuda" and weight_A.shape[0] > TRITON_MAX_RANK:
        return None, f"rank {weight_A.shape[0]} > {TRITON_MAX_RANK}, the triton kernels' limit"
    return adapter, None


def _linear_4bit_dtype_reason(base, x: torch.Tensor, x_dtype) -> str | None:
    """Why the fused op, computing in x's dtype, would differ from ``Linear4bit.forward`` on this input, or None.

    Linear4bit casts x to its ``compute_dtype`` (when set) and its result back to x's dtype; under
    autocast its result is cast back to x's own dtype too. The fused op computes in x's (autocast)
    dtype: the same when the compute dtype is x's, and x is already in the autocast dtype.
    """
    if x_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the input is {x.dtype}; a 4-bit base computes in float16, bfloat16 or float32"
    if x_dtype != x.dtype:
        return f"autocast to {x_dtype} with an input in {x.dtype} (Linear4bit returns the input's dtype)"
    compute_dtype = base.compute_dtype
    if compute_dtype is not None and compute_dtype != x_dtype:
        return f"its Linear4bit computes in {compute_dtype} (compute_dtype), the input is {x_dtype}"
    return None


def _fused_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``FusedPeftLinear.forward``: the fused op when it computes PEFT's result, else PEFT's forward."""
    adapter = None
    if not args and not kwargs:  # adapter_names (mixed batches), variant kwargs: PEFT's business
        adapter, _ = fused_adapter(module, x)
    if adapter is None:
        return module._peft_forward(x, *args, **kwargs)
    children = module._modules
    base = children["base_layer"]
    dropout = children["lora_dropout"][adapter]
    p = float(dropout.p) if type(dropout) is nn.Dropout else 0.0
    bias = base.bias
    if bias is not None and type(module) is not _FUSED_PEFT_LINEAR:
        dtype = _autocast_dtype(x, x.device.type)
        if bias.dtype != dtype:  # Linear4bit casts its bias to the input's dtype (in place; here a copy)
            bias = bias.to(dtype)
    return fused_lora_linear(x, base.weight, bias, children["lora_A"][adapter].weight,
                             children["lora_B"][adapter].weight, float(module.scaling[adapter]), p,
                             training=bool(dropout.training), backend=module.fused_lora_backend)


def _fused_class(name: str, peft_class: type, doc: str) -> type:
    """A subclass ``name`` of the PEFT LoRA layer class ``peft_class`` whose forward is ``_fused_forward``.
    Its repr is PEFT's (``lora.Linear(...)``): ``_get_name`` gives PEFT's class name; the model's
    ``fused_lora_summary`` says which modules are fused."""
    peft_name = peft_class.__name__
    return type(name, (peft_class,), {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                      "fused_lora_backend": None, "forward": _fused_forward,
                                      "_peft_forward": peft_class.forward, "fused_adapter": fused_adapter,
                                      "_get_name": lambda self: peft_name})


_FUSED_PEFT_LINEAR = None


def fused_peft_linear_type():
    """The class ``FusedPeftLinear``: PEFT's ``lora.Linear`` with a fused forward (created when peft is imported)."""
    global _FUSED_PEFT_LINEAR
    if _FUSED_PEFT_LINEAR is None:
        _FUSED_PEFT_LINEAR = _fused_class(
            "FusedPeftLinear", _peft_lora_types()[1],
            "PEFT's ``lora.Linear``, whose forward runs ``fused_lora_linear`` when that computes what PEFT would\n"
            "(see ``fused_adapter``), and PEFT's own forward otherwise. ``fused_lora_backend``: None (automatic) "
            "or a backend name.")
    return _FUSED_PEFT_LINEAR


_FUSED_PEFT_LINEAR_4BIT = None


def _peft_linear_4bit_type():
    """PEFT's ``peft.tuners.lora.bnb.Linear4bit``, or None. NOTE: never imports bitsandbytes (nor PEFT's bnb
    module, which would): a model holding such a layer has imported both."""
    if "bitsandbytes" not in sys.modules:
        return None
    module = sys.modules.get("peft.tuners.lora.bnb")
    return getattr(module, "Linear4bit", None) if module is not None else None


def fused_peft_linear_4bit_type():
    """The class ``FusedPeftLinear4bit``: PEFT's ``bnb.Linear4bit`` LoRA layer (QLoRA) with a fused forward."""
    global _FUSED_PEFT_LINEAR_4BIT
    if _FUSED_PEFT_LINEAR_4BIT is None:
        peft_linear_4bit = _peft_linear_4bit_type()
        if peft_linear_4bit is None:
            import importlib

            from ..quantized import require_bitsandbytes

            require_bitsandbytes()
            peft_linear_4bit = importlib.import_module("peft.tuners.lora.bnb").Linear4bit
        _FUSED_PEFT_LINEAR_4BIT = _fused_class(
            "FusedPeftLinear4bit", peft_linear_4bit,
            "PEFT's ``bnb.Linear4bit`` LoRA layer over a bitsandbytes 4-bit base, whose forward runs "
            "``fused_lora_linear``\n(the 4-bit weight read in place) when that computes what PEFT would (see "
            "``fused_adapter``), and PEFT's own forward otherwise.")
    return _FUSED_PEFT_LINEAR_4BIT


def __getattr__(name):
    # NOTE: the classes exist only once peft (and bitsandbytes) are imported; created on first use, also by pickle.
    if name == "FusedPeftLinear":
        return fused_peft_linear_type()
    if name == "FusedPeftLinear4bit":
        return fused_peft_linear_4bit_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_type_of(module, peft_linear_type=None):
    """The fused class a PEFT LoRA module becomes in ``from_peft`` (FusedPeftLinear, or FusedPeftLinear4bit over
    a bitsandbytes 4-bit base), or None for the others."""
    if peft_linear_type is None:
        peft_linear_type = _peft_lora_types()[1]
    if type(module) in (peft_linear_type, _FUSED_PEFT_LINEAR):
        return fused_peft_linear_type()
    linear_4bit = _peft_linear_4bit_type()
    if linear_4bit is not None and type(module) in (linear_4bit, _FUSED_PEFT_LINEAR_4BIT):
        return fused_peft_linear_4bit_type()
    return None


# PEFT's MultiheadAttention LoRA wraps the attention's out_proj as a lora.Linear and merges its adapter
# around each call, since nn.MultiheadAttention reads out_proj.weight: that lora.Linear's forward never
# runs. (A TransformerEncoderLayer calls linear1/linear2 while training, so their fused forward runs.)
PEFT_WEIGHT_READ_BY_PARENT = ((nn.MultiheadAttention, ("out_proj",)),)
PEFT_WEIGHT_READ_REASON = ("is the out_proj of a MultiheadAttention, which reads its weight directly (PEFT "
                           "merges the adapter around each call; a fused forward would never run)")


def conversion_problem(model: nn.Module, name: str, peft_linear_type=None) -> str | None:
    """None when ``from_peft`` converts the PEFT LoRA layer ``name`` of ``model`` (its class becomes
    FusedPeftLinear), else why not: a phrase after the module's name, the same for every module with
    that reason (the summary groups by it). The one place that decides which modules can take the
    fused path.

    Converted: ``peft.tuners.lora.Linear`` over an unquantised ``nn.Linear``, and PEFT's
    ``lora.bnb.Linear4bit`` over a bitsandbytes 4-bit ``Linear4bit`` (QLoRA; it becomes
    FusedPeftLinear4bit). Not converted: other layer types (Embedding, Conv, MultiheadAttention,
    8-bit and other quantised layers), ``fan_in_fan_out`` (Conv1D-style weights), a
    base layer of another kind, and active adapters using DoRA or another variant,
    ``lora_bias``, or a dropout other than ``nn.Dropout``, and the ``out_proj`` of a
    MultiheadAttention (PEFT_WEIGHT_READ_BY_PARENT). What can change between calls (adapters merged or
    disabled, several active adapters, dtypes, hooks) is decided per call by ``fused_adapter``.
    """
    module = model.get_submodule(name)
    if peft_linear_type is None:
        peft_linear_type = _peft_lora_types()[1]
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    fused_type = fused_type_of(module, peft_linear_type)
    if fused_type is not None and fused_type is _FUSED_PEFT_LINEAR_4BIT:
        if not is_linear_4bit(base):
            return (f"is PEFT's bnb.Linear4bit over a {type(base).__name__} (fused_lora fuses it over a "
                    f"bitsandbytes Linear4bit)")
        return _adapter_problem(module)
    if type(module) not in (peft_linear_type, fused_peft_linear_type()):  # a subclass may compute otherwise
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        if base is not None and _has_quantised_weight(base):
            return (f"has a quantised base layer {type(base).__module__}.{type(base).__name__} (a {kind}; "
                    f"quantised base layers are not supported)")
        return (f"is a {kind} over a {type(base).__name__} (fused_lora fuses peft.tuners.lora.Linear over "
                f"torch.nn.Linear only)")
    if getattr(module, "fan_in_fan_out", False):
        return "uses fan_in_fan_out=True (Conv1D-style weights)"
    if not isinstance(base, nn.Linear) or _is_quantised(base):
        return (f"has a base layer {type(base).__name__} with weight dtype "
                f"{getattr(getattr(base, 'weight', None), 'dtype', None)} (fused_lora supports unquantised "
                f"torch.nn.Linear bases only; quantised base layers are not supported)")
    if _weight_reader(model, name, PEFT_WEIGHT_READ_BY_PARENT) is not None:
        return PEFT_WEIGHT_READ_REASON
    return _adapter_problem(module)


def _adapter_problem(module) -> str | None:
    """Why an active adapter of ``module`` is one the fused op never computes, or None."""
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            return "uses DoRA (use_dora=True)"
        variant = module.lora_variant.get(adapter)
        if variant is not None:
            return f"uses the LoRA variant {type(variant).__name__} (fused_lora computes plain LoRA)"
        if getattr(module, "lora_bias", {}).get(adapter, False) or module.lora_B[adapter].bias is not None:
            return "uses lora_bias=True"
        dropout = module.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"uses a {type(dropout).__name__} as LoRA dropout (fused: nn.Dropout)"
    return None


class FromPeftSummary:
    """What ``from_peft`` did: ``fused``, the names of the modules that take the fused path, and
    ``not_fused``, a dict from each reason to the names of the modules that keep PEFT's own forward
    for it. ``str()`` gives a few lines for a log."""

    def __init__(self, fused: list[str], not_fused: dict[str, list[str]]):
        self.fused = tuple(fused)
        self.not_fused = {reason: tuple(names) for reason, names in not_fused.items()}

    @property
    def total(self) -> int:
        return len(self.fused) + sum(len(names) for names in self.not_fused.values())

    def __repr__(self) -> str:
        counts = {reason: len(names) for reason, names in self.not_fused.items()}
        return f"FromPeftSummary(fused={len(self.fused)}, not_fused={counts})"

    def __str__(self) -> str:
        kept = self.total - len(self.fused)
        lines = [f"from_peft: {len(self.fused)} of {self.total} PEFT LoRA modules take the fused path"
                 + (f"; {kept} keep PEFT's own forward:" if kept else "")]
        for reason, names in self.not_fused.items():
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            lines.append(f"  {len(names)} {reason}: {shown}")
        return "\n".join(lines)


def from_peft(peft_model: nn.Module, *, backend: str | None = None, strict: bool = False) -> nn.Module:
    """Route the forward of every PEFT LoRA ``Linear`` in ``peft_model`` through ``fused_lora_linear``, in place.

    The modules stay PEFT's (their class becomes ``FusedPeftLinear``, a subclass of
    ``peft.tuners.lora.Linear``; over a bitsandbytes 4-bit base, QLoRA, ``FusedPeftLinear4bit``, a
    subclass of PEFT's ``lora.bnb.Linear4bit``, whose 4-bit weight is read in place and never
    changed), so every PEFT feature keeps working: ``save_pretrained``,
    ``merge_and_unload``, ``unload``, ``disable_adapter()``, ``set_adapter``, ``add_adapter``.
    A call takes the fused path while PEFT would compute plain LoRA with one active adapter
    and PEFT's own forward otherwise (``module.fused_adapter(x)`` says which, and why).

    Fuses what it can: a LoRA module the fused op cannot compute (``conversion_problem``: an
    Embedding, Conv or MultiheadAttention LoRA, a quantised base, ``fan_in_fan_out`` (GPT-2's
    Conv1D), DoRA or another variant, ``lora_bias``, a dropout other than ``nn.Dropout``) stays
    PEFT's own module, with PEFT's forward and outputs. The summary (a ``FromPeftSummary``: the
    fused modules, and the others grouped by reason) is logged at INFO level (logger
    ``fused_lora.integrations.peft``) and kept as ``peft_model.fused_lora_summary``; a
    UserWarning says so when no module could be fused. ``strict=True`` refuses instead, with a
    ValueError naming the first such module and its reason, before anything changes.
    ``backend``: None (automatic), "triton", "cpu" or "torch". Returns ``peft_model``.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model: expected a torch.nn.Module, got {type(peft_model).__name__}")
    if backend is not None:
        from ..ops.backends import BACKEND_NAMES
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, got {backend!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {type_name(strict)}")
    lora_layer_type, peft_linear_type = _peft_lora_types()
    found = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, lora_layer_type)]
    if not found:
        raise ValueError("peft_model: found no PEFT LoRA layer in the model")
    fused, not_fused = [], {}
    for name, module in found:
        problem = conversion_problem(peft_model, name, peft_linear_type)
        if problem is None:
            fused.append((name, module))
        elif strict:
            raise ValueError(f"from_peft: module {name!r} {problem}; not supported by fused_lora "
                             f"(strict=False keeps PEFT's forward for it and fuses the rest)")
        else:
            not_fused.setdefault(problem, []).append(name)
    for _, module in fused:
        module.__class__ = fused_type_of(module, peft_linear_type)
        module.fused_lora_backend = backend
    summary = FromPeftSummary([name for name, _ in fused], not_fused)
    peft_model.fused_lora_summary = summary
    _LOGGER.info("%s", summary)
    if not fused:
        warnings.warn(f"{summary}\nfrom_peft: no module could be fused; the model runs PEFT's forward everywhere",
                      UserWarning, stacklevel=2)
    return peft_model


# ---------------------------------------------------------------------------------------------
# The layers save_adapter / load_adapter see
# ---------------------------------------------------------------------------------------------

class PeftAdapterView:
    """A converted PEFT module's active adapter, with the attributes of a FusedLoRALinear that
    ``save_adapter`` and ``load_adapter`` use (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``scaling``, ``merged``, ``in_features``, ``out_features``, ``lora_A``, ``lora_B``: the PEFT
    module's own Parameters)."""

    def __init__(self, name: str, module):
        adapter, reason = fused_adapter(module)
        if adapter is None and not module.merged:
            raise ValueError(f"model: layer {name!r} cannot be read as one plain LoRA adapter ({reason}); "
                             f"use PEFT's save_pretrained / load_adapter for it")
        if adapter is None:
            adapter = module.active_adapters[0]
        self.module, self.adapter = module, adapter
        self.r = module.r[adapter]
        self.lora_alpha = module.lora_alpha[adapter]
        self.use_rslora = bool(module.use_rslora.get(adapter, False)) if isinstance(module.use_rslora, dict) \
            else bool(module.use_rslora)
        self.scaling = float(module.scaling[adapter])
        self.merged = bool(module.merged)
        self.lora_A = module.lora_A[adapter].weight
        self.lora_B = module.lora_B[adapter].weight
        self.out_features, self.in_features = self.lora_B.shape[0], self.lora_A.shape[1]

    @property
    def lora_dropout(self) -> float:
        dropout = self.module.lora_dropout[self.adapter]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0

    @lora_dropout.setter
    def lora_dropout(self, p: float) -> None:
        p = check_dropout_p(p)
        self.module.lora_dropout[self.adapter] = nn.Dropout(p) if p > 0.0 else nn.Identity()
        self.module.lora_dropout[self.adapter].train(self.module.training)


def lora_layers(model: nn.Module) -> list[tuple[str, FusedLoRALinear]]:
    """The (qualified name, layer) pairs of every FusedLoRALinear in ``model``; a module converted by
    ``from_peft`` appears as a ``PeftAdapterView`` of its active adapter.

    A PEFT LoRA module that ``from_peft`` left to PEFT (an Embedding LoRA, say) is a ValueError: an
    adapter file written or read without it would be incomplete; PEFT's own save/load handle it.
    """
    fused_types = tuple(t for t in (_FUSED_PEFT_LINEAR, _FUSED_PEFT_LINEAR_4BIT) if t is not None)
    lora_layer_type = _peft_lora_types()[0] if fused_types else None
    layers, left = [], []
    for name, module in model.named_modules():
        if isinstance(module, FusedLoRALinear):
            layers.append((name, module))
        elif fused_types and isinstance(module, fused_types):
            layers.append((name, PeftAdapterView(name, module)))
        elif lora_layer_type is not None and isinstance(module, lora_layer_type):
            left.append(name)
    if left and any(isinstance(layer, PeftAdapterView) for _, layer in layers):
        name = left[0]
        raise ValueError(f"model: layer {name!r} is a PEFT LoRA module that from_peft left to PEFT "
                         f"({conversion_problem(model, name) or 'not converted'}; {len(left)} such in all); "
                         f"use PEFT's save_pretrained / load_adapter for this model")
    return layers
