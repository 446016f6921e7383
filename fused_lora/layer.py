"""``FusedLoRALinear``: a drop-in LoRA linear layer (PEFT's ``lora.Linear`` semantics)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import HALF_DTYPES, SUPPORTED_DTYPES, check_dropout_p, check_rank, check_scaling, is_finite_real, plain_number
from .functional import fused_lora_linear
from .quantized import is_linear_4bit, is_params_4bit, plain_linear_4bit, refuse_8bit, weight_4bit


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return int(value)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), checked to be a valid ``scaling``."""
    if not is_finite_real(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite real number, got {lora_alpha!r}")
    scaling = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
    try:
        return check_scaling(scaling)
    except ValueError as error:
        raise ValueError(f"lora_alpha: gives {error}") from None


def linear_problem(linear: nn.Module) -> str | None:
    """None when ``linear`` computes exactly ``F.linear(x, weight, bias)``, so a FusedLoRALinear built
    from it computes what it did; else why not, as a phrase after the module's name.

    Refused: a module that is no ``nn.Linear``; a subclass with its own ``forward``; a ``forward``
    patched on the instance; forward hooks, forward pre-hooks or backward hooks registered on
    it (replacing the module would drop them); a weight that is not fp16/bf16/fp32/fp64 (a
    quantised layer). A subclass that keeps ``nn.Linear.forward`` is fine. Global hooks
    (``register_module_forward_hook``) stay: they run on the new module too.

    The one quantised layer taken: bitsandbytes' ``Linear4bit``, held to the same rules against
    ``Linear4bit.forward``, with a 4-bit weight fused_lora can read in place (``weight_4bit``).
    """
    if not isinstance(linear, nn.Linear):
        return f"is a {type(linear).__name__}, not a torch.nn.Linear"
    if is_linear_4bit(linear):
        return _linear_4bit_problem(linear)
    kind = type(linear)
    if kind.forward is not nn.Linear.forward:
        return (f"is a {kind.__module__}.{kind.__qualname__}, a subclass of torch.nn.Linear with its own "
                f"forward, which a FusedLoRALinear would not run")
    state = linear.__dict__
    if "forward" in state:
        return "has a forward patched on the instance, which a FusedLoRALinear would not run"
    problem = _hooks_problem(state)
    if problem is not None:
        return problem
    weight = state["_parameters"].get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        return (f"has a weight of dtype {getattr(weight, 'dtype', None)} (fused_lora supports float16, bfloat16, "
                f"float32 and float64 weights, not quantised layers)")
    return None


def _hooks_problem(state: dict) -> str | None:
    """Hooks registered on a module (its ``__dict__``), which replacing the module would drop."""
    for attribute, what in (("_forward_pre_hooks", "forward pre-hooks"), ("_forward_hooks", "forward hooks"),
                            ("_backward_pre_hooks", "backward pre-hooks"), ("_backward_hooks", "backward hooks")):
        hooks = state.get(attribute)
        if hooks:
            return f"has {len(hooks)} {what}, which a FusedLoRALinear replacing it would drop"
    return None


def _linear_4bit_problem(linear: nn.Module) -> str | None:
    """``linear_problem`` of a bitsandbytes ``Linear4bit``."""
    if not plain_linear_4bit(linear):
        return (f"is a {type(linear).__module__}.{type(linear).__qualname__} with its own forward, a patched forward "
                f"or forward hooks (fused_lora takes a plain bitsandbytes Linear4bit)")
    problem = _hooks_problem(linear.__dict__)  # backward hooks: plain_linear_4bit looks at the forward only
    if problem is not None:
        return problem
    try:
        weight_4bit(linear.weight, "its weight")
    except (TypeError, ValueError) as error:
        return f"has a 4-bit weight fused_lora cannot read in place ({error})"
    return None


def base_dtype_of(linear: nn.Module) -> torch.dtype | None:
    """What a linear layer's adapter dtypes depend on: its weight's dtype, or None for a bitsandbytes 4-bit
    weight (a ``Linear4bit``, or a FusedLoRALinear over one), which computes in the input's dtype."""
    weight = linear.weight
    return None if is_params_4bit(weight) else weight.dtype


def adapter_dtypes(base_dtype: torch.dtype | None) -> tuple[torch.dtype, ...]:
    """The adapter dtypes the fused op takes with a base (and input) of ``base_dtype``, PEFT's default
    (``autocast_adapter_dtype=True``) first: fp32 or the base's dtype on an fp16/bf16 base, else the
    base's dtype; on a 4-bit base (``base_dtype`` None, see ``base_dtype_of``) fp32, fp16 or bf16."""
    if base_dtype is None:
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32, base_dtype) if base_dtype in HALF_DTYPES else (base_dtype,)


def default_adapter_dtype(base_dtype: torch.dtype | None) -> torch.dtype:
    """PEFT's default (``autocast_adapter_dtype=True``): fp32 adapters on fp16/bf16 and 4-bit bases, else the
    base's dtype."""
    return adapter_dtypes(base_dtype)[0]


def check_adapter_dtype(adapter_dtype, base_dtype: torch.dtype | None) -> torch.dtype:
    """``adapter_dtype`` (None: ``default_adapter_dtype``) checked to be one the fused op takes with
    a base (and input) of ``base_dtype`` (``adapter_dtypes``; None: a 4-bit base)."""
    allowed = adapter_dtypes(base_dtype)
    if adapter_dtype is None:
        return allowed[0]
    if adapter_dtype not in allowed:
        names = " or ".join(filter(None, (", ".join(str(d) for d in allowed[:-1]), str(allowed[-1]))))
        base = "a 4-bit base" if base_dtype is None else f"a base of dtype {base_dtype}"
        raise TypeError(f"adapter_dtype: expected None, {names} for {base}, got {adapter_dtype!r}")
    return adapter_dtype


class FusedLoRALinear(nn.Module):
    """``y = x W^T + b + scaling * lora_B(lora_A(dropout(x)))`` with frozen W, b.

    Attributes: ``weight`` (out, in) and ``bias`` (out,) frozen; ``lora_A``
    (r, in) and ``lora_B`` (out, r) trainable; ``r``, ``lora_alpha``,
    ``lora_dropout`` (the probability), ``scaling``, ``merged``; ``backend``
    (None = automatic, or "triton" / "cpu" / "torch"; under torch.compile the
    choice is fixed when the model is traced, see ``fused_lora_linear``). Dropout
    follows ``self.training``. ``lora_dropout`` and ``scaling`` are checked whenever set.

    ``adapter_dtype``: the dtype of lora_A and lora_B. None (the default) is PEFT's
    default (``autocast_adapter_dtype=True``): fp32 adapters on an fp16/bf16 base (the
    LoRA branch then runs in fp32), the base's dtype otherwise. An fp16/bf16 base may
    also take adapters in its own dtype (faster, less precise).

    ``merged`` is part of the state dict (``get_extra_state``), so a merged layer's
    state loads as merged: the merged weight is never counted twice. A merged layer
    runs the base linear only, and refuses to run where it would be trained (training
    mode, gradients enabled, lora_A or lora_B requiring grad): ``unmerge()`` first.
    While merged the adapter cannot be edited: setting ``lora_A``, ``lora_B``,
    ``weight``, ``scaling``, ``r``, ``lora_alpha`` or ``use_rslora``,
    ``reset_lora_parameters()``, and loading a state dict with adapter tensors but not
    both the weight and the merged flag raise (``unmerge()`` first). ``merge()`` keeps a
    copy of the adapter it added (r * (in + out) elements, the non-persistent buffers
    ``merged_lora_A`` and ``merged_lora_B``, None while unmerged), so ``unmerge()`` subtracts
    exactly that even after an in-place change of lora_A or lora_B, which a merged
    forward refuses to run with (an edit through ``.data`` bypasses the version counter
    that check reads, so such a forward runs the adapter merged before; ``unmerge()``
    stays exact).
    """

    # NOTE: what merge() folded into weight, and what unmerge() must subtract again.
    _MERGE_LOCKED = frozenset(("lora_A", "lora_B", "weight", "scaling", "r", "lora_alpha", "use_rslora"))

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None, adapter_dtype=None):
        super().__init__()
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype: expected None, torch.float16, torch.bfloat16, torch.float32 or torch.float64, "
                            f"got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.r = check_rank(r)
        self.lora_dropout = lora_dropout
        self.scaling = lora_scaling(self.r, lora_alpha, use_rslora)
        # NOTE: a plain Python number (a numpy or other Real stays exact): save_adapter writes it to JSON.
        self.lora_alpha = plain_number(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        self.backend: str | None = None

        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        adapter_factory = {"device": device, "dtype": check_adapter_dtype(adapter_dtype, self.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **adapter_factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **adapter_factory))
        # The adapter merge() added (unmerge() subtracts it): buffers, so .to() moves them; not saved.
        self.register_buffer("merged_lora_A", None, persistent=False)
        self.register_buffer("merged_lora_B", None, persistent=False)
        self._merged_scaling = None
        self._merged_versions = None
        self._reset_base_parameters()
        self.reset_lora_parameters()

    def __setattr__(self, name, value) -> None:
        if name in FusedLoRALinear._MERGE_LOCKED and self.__dict__.get("merged", False):
            raise RuntimeError(f"FusedLoRALinear: cannot set {name} while the adapter is merged into weight "
                               f"(unmerge() must subtract what merge() added); call unmerge() first")
        super().__setattr__(name, value)

    @property
    def lora_dropout(self) -> float:
        """Dropout probability of the LoRA branch input, in [0, 1)."""
        return self._lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, value) -> None:
        self._lora_dropout = check_dropout_p(value, "lora_dropout")

    @property
    def scaling(self) -> float:
        """The LoRA scale: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self._scaling

    @scaling.setter
    def scaling(self, value) -> None:
        self._scaling = check_scaling(value)

    def get_extra_state(self) -> torch.Tensor:
        """The state dict records ``merged`` (a 0-d bool tensor, so safetensors can store it)."""
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.dim() == 0 and state.dtype == torch.bool:
            state = bool(state.item())
        if not isinstance(state, bool):
            raise ValueError(f"state_dict: expected the FusedLoRALinear extra state to be a 0-d bool tensor "
                             f"(merged), got {state!r}")
        # NOTE: called after weight, lora_A and lora_B were loaded (_load_from_state_dict makes sure
        # they came together): the flag now says what that weight is, merged with that adapter.
        self.__dict__["merged"] = False
        self._forget_merged_adapter()
        if state:
            self._remember_merged_adapter()
            self.merged = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = getattr(self.weight, "quant_state", None) if self.is_4bit else None
        if state is not None:
            # The keys bitsandbytes' Linear4bit writes (weight.absmax, weight.quant_map, ...), so the
            # 4-bit weight can be read back (here, or by transformers' bitsandbytes loader).
            weight_4bit(self.weight)  # refuses a layout it could not be read back from
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        quant_keys = [key for key in state_dict if key.startswith(prefix + "weight.")]
        if quant_keys and self.is_4bit and prefix + "weight" in state_dict:
            # A 4-bit weight with its quant_state: a new Params4bit from the stored bytes (never written into
            # the old one, which another module may share); the rest loads as usual.
            stats = {key[len(prefix + "weight."):]: state_dict[key] for key in quant_keys}
            device = self.weight.device
            self.weight = type(self.weight).from_prequantized(state_dict[prefix + "weight"].to(device), stats,
                                                              requires_grad=False, device=device)
            state_dict = {key: value for key, value in state_dict.items()
                          if key not in quant_keys and key != prefix + "weight"}
            self._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                       error_msgs)
            if prefix + "weight" in missing_keys:
                missing_keys.remove(prefix + "weight")
            return
        # NOTE: weight, the merged flag and the adapter merged into weight must stay consistent: a
        # merged layer (or a state that says merged) loads the weight and the flag together, or nothing.
        keys = {name: prefix + name in state_dict for name in ("weight", "_extra_state", "lora_A", "lora_B")}
        incoming = state_dict.get(prefix + "_extra_state")
        merged_in = isinstance(incoming, torch.Tensor) and incoming.dim() == 0 and bool(incoming.item())
        if (self.merged or merged_in) and any(keys.values()) and not (keys["weight"] and keys["_extra_state"]):
            error_msgs.append(
                f"{prefix.rstrip('.') or 'FusedLoRALinear'}: "
                + ("the adapter is merged into weight" if self.merged else "the state says merged")
                + f", and the state dict holds {[name for name, present in keys.items() if present]} but not both "
                  f"'weight' and '_extra_state' (the merged flag); loading it would leave the weight and the adapter "
                  f"disagreeing: unmerge() first, or load a whole state dict")
            return
        if self.merged and keys["weight"]:
            # NOTE: weight and flag come together (checked above): set_extra_state sets the flag again,
            # and load_state_dict(assign=True) may assign the new tensors meanwhile.
            self.__dict__["merged"] = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _reset_base_parameters(self) -> None:
        # nn.Linear's initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A kaiming-uniform (a=sqrt(5)), B zeros, so a fresh layer equals the base."""
        if self.merged:
            raise RuntimeError("FusedLoRALinear.reset_lora_parameters: the adapter is merged into weight; "
                               "call unmerge() first")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False, adapter_dtype=None) -> "FusedLoRALinear":
        """Wrap an ``nn.Linear``: reuses (and freezes) its weight and bias tensors.

        ``linear`` must compute exactly ``F.linear`` (``linear_problem``): a subclass with its own
        forward, a patched forward, or hooks on it are a ValueError, since the new layer would not
        run them. ``adapter_dtype``: as in ``FusedLoRALinear`` (None: fp32 on fp16/bf16 weights).

        The one supported subclass: bitsandbytes' ``Linear4bit`` (NF4 or FP4, quantized: moved to
        its device once; QLoRA), plain (no own forward, no hooks). ``weight`` becomes its
        ``Params4bit``, used in place (never copied, repacked or modified); the layer computes in
        x's dtype, its adapters are fp32 by default (PEFT's default over 4-bit bases; fp16 or
        bf16 by ``adapter_dtype``), and it cannot be merged (that would requantize the weight). A
        ``Linear8bitLt`` is a ValueError naming it.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        refuse_8bit("linear", linear)
        problem = linear_problem(linear)
        if problem is not None:
            raise ValueError(f"linear: the module {problem}")
        base_dtype = base_dtype_of(linear)  # None: a 4-bit weight, computed in x's dtype
        adapter_dtype = check_adapter_dtype(adapter_dtype, base_dtype)
        # NOTE: built on the meta device, then given the linear's own tensors (a 4-bit base: adapter-dtype stand-ins).
        layer = cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, bias=linear.bias is not None, use_rslora=use_rslora,
                    device="meta", dtype=base_dtype or adapter_dtype, adapter_dtype=adapter_dtype)
        linear.weight.requires_grad_(False)
        layer.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        factory = {"device": linear.weight.device, "dtype": adapter_dtype}
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, **factory))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, layer.r, **factory))
        layer.reset_lora_parameters()
        return layer

    @property
    def is_4bit(self) -> bool:
        """True when ``weight`` is a bitsandbytes 4-bit ``Params4bit`` (from ``from_linear(Linear4bit)``)."""
        return is_params_4bit(self.weight)

    def _refuse_merge_4bit(self, what: str) -> None:
        if self.is_4bit:
            raise RuntimeError(f"FusedLoRALinear.{what}: the base weight is 4-bit (bitsandbytes Params4bit); "
                               f"merging would dequantize, add and requantize it (lossy) and fused_lora never modifies "
                               f"a 4-bit weight. Merge with PEFT (merge_and_unload) or into a dequantized copy")

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in fp32 (fp64 for fp64 weights), shape (out, in)."""
        return self._delta(self.lora_A, self.lora_B, self.scaling)

    def _delta(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)) * scaling

    def _remember_merged_adapter(self) -> None:
        self.merged_lora_A = self.lora_A.detach().clone()
        self.merged_lora_B = self.lora_B.detach().clone()
        self._merged_scaling = self.scaling
        self._merged_versions = (self.lora_A._version, self.lora_B._version)

    def _forget_merged_adapter(self) -> None:
        self.merged_lora_A = self.merged_lora_B = None
        self._merged_scaling = self._merged_versions = None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (computed in fp32, as PEFT does)."""
        self._refuse_merge_4bit("merge")
        if self.merged:
            raise RuntimeError("FusedLoRALinear.merge: the adapter is already merged")
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self._remember_merged_adapter()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract from ``weight`` the adapter that ``merge()`` added (exact up to rounding)."""
        self._refuse_merge_4bit("unmerge")
        if not self.merged:
            raise RuntimeError("FusedLoRALinear.unmerge: the adapter is not merged")
        if self.merged_lora_A is None:  # merged set by hand: the adapter as it is now
            delta = self.delta_weight()
        else:
            delta = self._delta(self.merged_lora_A, self.merged_lora_B, self._merged_scaling)
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.__dict__["merged"] = False
        self._forget_merged_adapter()

    def _check_merged_adapter(self) -> None:
        """A merged forward refuses an adapter changed in place since merge(): weight holds the old one."""
        if self._merged_versions == (self.lora_A._version, self.lora_B._version):
            return
        if (self.merged_lora_A is not None
                and torch.equal(self.lora_A.detach(), self.merged_lora_A.to(self.lora_A.dtype))
                and torch.equal(self.lora_B.detach(), self.merged_lora_B.to(self.lora_B.dtype))):
            self._merged_versions = (self.lora_A._version, self.lora_B._version)  # e.g. moved by .to()
            return
        raise RuntimeError("FusedLoRALinear: lora_A or lora_B was changed in place while the adapter is merged "
                           "into weight, which still holds the adapter merge() added; call unmerge() (it "
                           "subtracts exactly that) and merge() again")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError(
                    "FusedLoRALinear: the adapter is merged into weight, so lora_A and lora_B would get no "
                    "gradient; call unmerge() before training, or run the merged layer in eval() mode or "
                    "under torch.no_grad() (or freeze lora_A and lora_B with requires_grad_(False))")
            if self._merged_versions is not None and not torch.compiler.is_compiling():
                self._check_merged_adapter()
            return F.linear(x, self.weight, self.bias)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype and self.is_4bit:
            # NOTE: a 4-bit base computes in x's dtype; its bias is cast to it, as Linear4bit does (a copy of N
            # elements per call; Linear4bit converts bias.data in place instead).
            bias = bias.to(x.dtype)
        return fused_lora_linear(x, self.weight, bias, self.lora_A, self.lora_B, self.scaling,
                                 self.lora_dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}"
                + (f", base={self.weight.quant_state.quant_type} (4-bit)" if self.is_4bit else ""))
