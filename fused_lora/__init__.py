"""fused_lora: fused LoRA linear layers (Triton on GPU, C++ on CPU, PyTorch fallback).

The public names load on first use (PEP 562), so ``import fused_lora`` and the
calculator (``python -m fused_lora.memory --params 7e9``) do not pay for importing torch.

Layout (each folder's ``__init__`` says more):

* here: the public API and its chain, ``functional`` (``fused_lora_linear``) -> ``function``
  (``FusedLoRAFunction``, the only autograd) -> ``ops`` (the backends); ``layer``
  (``FusedLoRALinear``), ``reference`` (the eager formula), ``dropout`` and ``philox`` (the
  mask), ``checks`` (argument checks), ``quantized`` (bitsandbytes 4-bit bases read in place:
  ``pip install .[qlora]``);
* ``ops/``: one module per backend (torch, cpu, triton) and the torch.compile custom ops;
* ``kernels``: the Triton kernels, from the repository's ``kernels/triton/`` folder;
* ``integrations/``: PEFT models and adapter files;
* ``memory/``: the compute-requirements calculator.

A source checkout imports like the installed package: setup.py installs ``kernels/triton/``
as ``fused_lora.kernels``, and the same mapping is made here when this file sits beside
``setup.py`` and ``kernels/triton/``. The top-level ``kernels/`` folder has no ``__init__.py``
on purpose, so that ``import kernels`` run from the checkout finds Hugging Face's installed
``kernels`` package rather than this folder. A checkout without its C++ extension that would hide an
installed copy which has one fails at import with what to do, instead of silently
running the slower torch backend.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "FusedLoRAFunction": "function",
    "FusedLoRALinear": "layer",
    "apply_lora": "integrations.peft",
    "available_backends": "ops.backends",
    "count_parameters": "memory.parameters",
    "dropout_mask": "dropout",
    "from_peft": "integrations.peft",
    "fused_lora_linear": "functional",
    "load_adapter": "integrations.adapters",
    "lora_linear_reference": "reference",
    "print_trainable_parameters": "memory.parameters",
    "reference": None,  # the submodule itself
    "save_adapter": "integrations.adapters",
}
__all__ = sorted(_EXPORTS)

# The oldest torch with every API the package uses (torch.library.custom_op and register_fake,
# torch.is_autocast_enabled(device_type), torch.get_autocast_dtype); setup.py's MIN_TORCH too.
MIN_TORCH = (2, 4)

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_SOURCE_KERNELS = os.path.join(_ROOT, "kernels", "triton")


def _source_checkout() -> bool:
    """True when imported from the repository (``setup.py`` and ``kernels/triton/`` beside this package)."""
    return (not os.path.isdir(os.path.join(_HERE, "kernels"))
            and os.path.isfile(os.path.join(_ROOT, "setup.py"))
            and os.path.isfile(os.path.join(_SOURCE_KERNELS, "__init__.py")))


def _map_source_kernels() -> None:
    """Make ``fused_lora.kernels`` the checkout's ``kernels/triton/``, as setup.py's package_dir does."""
    name = __name__ + ".kernels"
    if name in sys.modules:
        return
    directory = _SOURCE_KERNELS
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


def _has_extension(directory: str) -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return any(os.path.isfile(os.path.join(directory, "_C" + suffix)) for suffix in suffixes)


def _installed_copy_with_extension() -> str | None:
    """The directory of an installed fused_lora (not this checkout) that has the C++ extension, if any.

    Every installed copy counts, not only the first one the metadata lookup meets: ``pip install .``
    leaves ``fused_lora.egg-info/`` in the checkout, and from the repository root that egg-info (which
    lists no extension) comes first on ``sys.path``. An editable install of another checkout
    (``pip install -e``, found by its ``direct_url.json``) and copies on ``sys.path`` without
    metadata count too.
    """
    import importlib.metadata
    import json
    import urllib.parse
    import urllib.request

    here = os.path.realpath(_HERE)
    candidates = []
    for distribution in importlib.metadata.distributions(name=__name__):
        for file in distribution.files or []:
            parts = file.parts
            if len(parts) == 2 and parts[0] == __name__ and parts[1].startswith("_C."):
                candidates.append(os.path.dirname(os.path.abspath(str(file.locate()))))
        try:
            origin = json.loads(distribution.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        origin = origin if isinstance(origin, dict) else {}
        url, info = origin.get("url"), origin.get("dir_info")
        if isinstance(info, dict) and info.get("editable") and isinstance(url, str) and url.startswith("file:"):
            candidates.append(os.path.join(urllib.request.url2pathname(urllib.parse.urlparse(url).path), __name__))
    candidates += [os.path.join(entry or os.curdir, __name__) for entry in sys.path if isinstance(entry, str)]
    for directory in candidates:
        if os.path.realpath(directory) != here and _has_extension(directory):
            return os.path.abspath(directory)
    return None


def _check_not_shadowing() -> None:
    from .env import env_flag

    if env_flag("FUSED_LORA_SKIP_EXT", False) is True or _has_extension(_HERE):
        return
    installed = _installed_copy_with_extension()
    if installed is not None:
        raise ImportError(
            f"fused_lora: imported the source checkout {_HERE}, which has no built C++ extension, instead of "
            f"the installed package in {installed}; run from outside the checkout, or build it in place "
            f"(`python setup.py build_ext --inplace`, or `pip install --no-build-isolation -e .`)")


if _source_checkout():
    _check_not_shadowing()
    _map_source_kernels()


def _load_all() -> None:
    """Import every public name (and so register the custom ops), as an eager package would."""
    import torch

    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        raise ImportError(f"fused_lora needs torch>={'.'.join(map(str, MIN_TORCH))} (torch.library.custom_op), "
                          f"found torch {torch.__version__}")
    from .ops.backends import available_backends
    from .dropout import dropout_mask
    from .function import FusedLoRAFunction
    from .functional import fused_lora_linear
    from .layer import FusedLoRALinear
    from .integrations.adapters import load_adapter, save_adapter
    from .memory.parameters import count_parameters, print_trainable_parameters
    from .integrations.peft import apply_lora, from_peft
    from .reference import lora_linear_reference
    from . import reference

    globals().update(available_backends=available_backends, dropout_mask=dropout_mask,
                     FusedLoRAFunction=FusedLoRAFunction, fused_lora_linear=fused_lora_linear,
                     FusedLoRALinear=FusedLoRALinear, load_adapter=load_adapter, save_adapter=save_adapter,
                     count_parameters=count_parameters, print_trainable_parameters=print_trainable_parameters,
                     apply_lora=apply_lora, from_peft=from_peft, lora_linear_reference=lora_linear_reference,
                     reference=reference)


def __getattr__(name):
    # NOTE: the first public name asked for loads them all, so every side effect of the eager
    # package (custom-op registration) still happens. Submodules not imported yet stay absent
    # (AttributeError) as in any package: ``from . import x`` relies on that to import them.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_all()
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(__all__))
