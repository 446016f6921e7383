"""``FusedLoRALinear``: a drop-in LoRA linear layer (PEFT's ``lora.Linear`` semantics)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import SUPPORTED_DTYPES, check_dropout_p, check_rank, check_scaling, is_finite_real, plain_number
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


class FusedLoRALinear(nn.Module):
    """``y = x W^T + b + scaling * lora_B(lora_A(dropout(x)))`` with frozen W, b.

    Attributes: ``weight`` (out, in) and ``bias`` (out,) frozen; ``lora_A``
    (r, in) and ``lora_B`` (out, r) trainable; ``r``, ``lora_alpha``,
    ``lora_dropout`` (the probability), ``scaling``, ``merged``; ``backend``
    (None = automatic, or "triton" / "cpu" / "torch"). Dropout follows
    ``self.training``. ``lora_dropout`` and ``scaling`` are checked whenever set.

    ``merged`` is part of the state dict (``get_extra_state``), so a merged layer's
    state loads as merged: the merged weight is never counted twice. A merged layer
    runs the base linear only, and refuses to run where it would be trained (training
    mode, gradients enabled, lora_A or lora_B requiring grad): ``unmerge()`` first.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None):
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
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        self._reset_base_parameters()
        self.reset_lora_parameters()

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
        # NOTE: called after weight was loaded: the flag now says what that weight is.
        self.merged = state

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
                              error_msgs):
        quant_keys = [key for key in state_dict if key.startswith(prefix + "weight.")]
        if quant_keys and self.is_4bit:
            # A 4-bit weight with its quant_state: a new Params4bit from the stored bytes (never written into
            # the old one, which another module may share).
            params4bit = type(self.weight)
            stats = {key[len(prefix + "weight."):]: state_dict[key] for key in quant_keys}
            data = state_dict[prefix + "weight"]
            device = self.weight.device
            state_dict = {key: value for key, value in state_dict.items()
                          if key not in quant_keys and key != prefix + "weight"}
            self.weight = params4bit.from_prequantized(data.to(device), stats, requires_grad=False, device=device)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if prefix + "weight" in missing_keys:
                missing_keys.remove(prefix + "weight")
            return
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
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "FusedLoRALinear":
        """Wrap an ``nn.Linear``: reuses (and freezes) its weight and bias tensors.

        A bitsandbytes ``Linear4bit`` (NF4 or FP4, quantized: moved to its device once) is taken
        too: ``weight`` becomes its ``Params4bit``, used in place (never copied, repacked or
        modified); the layer then computes in x's dtype, and ``lora_A`` / ``lora_B`` are fp32
        (PEFT's default over 4-bit bases). A ``Linear8bitLt`` is refused (ValueError).
        """
        if is_linear_4bit(linear):
            return cls._from_linear_4bit(linear, r, lora_alpha, lora_dropout, use_rslora)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        refuse_8bit("linear", linear)
        layer = cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, bias=linear.bias is not None, use_rslora=use_rslora,
                    device="meta", dtype=linear.weight.dtype)
        linear.weight.requires_grad_(False)
        layer.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, **factory))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, layer.r, **factory))
        layer.reset_lora_parameters()
        return layer

    @classmethod
    def _from_linear_4bit(cls, linear, r, lora_alpha, lora_dropout, use_rslora) -> "FusedLoRALinear":
        if not plain_linear_4bit(linear):
            raise ValueError(f"linear: a {type(linear).__name__} with its own forward, a patched forward or forward "
                             f"hooks computes something other than bitsandbytes' Linear4bit; fused_lora takes only a "
                             f"plain Linear4bit")
        w4 = weight_4bit(linear.weight, "linear.weight")  # ValueError for what cannot be read in place
        device = w4.device
        layer = cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    bias=linear.bias is not None, use_rslora=use_rslora, device="meta", dtype=torch.float32)
        linear.weight.requires_grad_(False)
        layer.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, device=device, dtype=torch.float32))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, layer.r, device=device, dtype=torch.float32))
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
        dtype = torch.float64 if self.weight.dtype == torch.float64 and not self.is_4bit else torch.float32
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (computed in fp32, as PEFT does)."""
        self._refuse_merge_4bit("merge")
        if self.merged:
            raise RuntimeError("FusedLoRALinear.merge: the adapter is already merged")
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``weight`` again (exact up to rounding)."""
        self._refuse_merge_4bit("unmerge")
        if not self.merged:
            raise RuntimeError("FusedLoRALinear.unmerge: the adapter is not merged")
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError(
                    "FusedLoRALinear: the adapter is merged into weight, so lora_A and lora_B would get no "
                    "gradient; call unmerge() before training, or run the merged layer in eval() mode or "
                    "under torch.no_grad() (or freeze lora_A and lora_B with requires_grad_(False))")
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
