"""The contestants: one LoRA linear layer each, built from the same weights.

* ``linear``: a frozen ``nn.Linear`` (only dx in backward): the limit.
* ``fused_lora``: ``FusedLoRALinear`` with the automatic backend.
* ``fused_lora_torch``: ``FusedLoRALinear`` forced to the pure-PyTorch backend.
* ``peft``: PEFT's ``lora.Linear`` (the real peft package), adapters in the sweep's
  adapter dtype (fp32 on fp16/bf16 bases: PEFT's default).
* ``peft_bf16``: the same layer with its adapters in the base dtype (bf16/fp16 bases
  only: what users who cast the whole model get).
* ``peft_compile``: ``torch.compile`` of the PEFT layer.
* ``addmm_composite``: the Unsloth-style composite (addmm_ into the output,
  our own implementation of that strategy); p = 0 only, as in Unsloth.
* ``eager_composite``: ``F.linear(x, W, b) + F.linear(F.linear(F.dropout(x), A), B) * s``,
  the plain eager code a LoRA layer replaces (the latency row's yardstick).

With ``--base nf4`` (``NF4_PROVIDERS``), over a bitsandbytes ``Linear4bit`` (NF4, double
quantization, compute dtype = the sweep's dtype) quantized from the same weights; the frozen
dense ``linear`` stays the limit:

* ``fused_lora_nf4``: ``FusedLoRALinear.from_linear(Linear4bit)`` (the 4-bit weight read in place);
* ``peft_nf4``: PEFT's ``bnb.Linear4bit`` LoRA layer (QLoRA as PEFT runs it);
* ``linear_nf4``: the frozen ``Linear4bit`` alone (bitsandbytes' own 4-bit matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_lora
from fused_lora.ops.backends import backend_name_for

PROVIDERS = ("linear", "fused_lora", "fused_lora_torch", "peft", "peft_bf16", "peft_compile", "addmm_composite",
             "eager_composite")
NF4_PROVIDERS = ("linear", "fused_lora_nf4", "peft_nf4", "linear_nf4")
ALL_PROVIDERS = PROVIDERS + NF4_PROVIDERS[1:]


@dataclass
class Weights:
    """One layer's tensors, shared by every provider (copied into each)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @classmethod
    def random(cls, K, N, r, dtype, adapter_dtype, device, seed=0):
        # NOTE: drawn on the device itself: CPU draws moved to a GPU take minutes over a sweep.
        gen = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape, scale, dt):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

        return cls(rand(N, K, scale=K ** -0.5, dt=dtype), rand(N, scale=0.1, dt=dtype),
                   rand(r, K, scale=K ** -0.5, dt=adapter_dtype), rand(N, r, scale=r ** -0.5, dt=adapter_dtype),
                   scaling=2.0)


class _AddmmLoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with addmm_ into the outputs; no dropout (as Unsloth)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling):
        xa = x2d.to(lora_A.dtype) @ lora_A.t()
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        y.addmm_(xa.to(y.dtype), lora_B.t().to(y.dtype), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, xa)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.scaling
        dy_lora = dy.to(lora_A.dtype)
        dxa = dy_lora @ lora_B
        dB = (dy_lora.t() @ xa).mul_(s)
        dA = (dxa.t() @ x2d.to(lora_A.dtype)).mul_(s)
        dx = dy @ weight
        dx.addmm_(dxa.to(dx.dtype), lora_A.to(dx.dtype), alpha=s)
        return dx, None, None, dA, dB, None


class AddmmComposite(nn.Module):
    def __init__(self, w: Weights):
        super().__init__()
        self.weight = nn.Parameter(w.weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(w.bias.clone(), requires_grad=False) if w.bias is not None else None
        self.lora_A = nn.Parameter(w.lora_A.clone())
        self.lora_B = nn.Parameter(w.lora_B.clone())
        self.scaling = w.scaling

    def forward(self, x):
        y = _AddmmLoRAFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.lora_A,
                                     self.lora_B, self.scaling)
        return y.view(*x.shape[:-1], -1)


class EagerComposite(nn.Module):
    """The eager composite a LoRA layer replaces: one F.linear each, dropout on the LoRA input."""

    def __init__(self, w: Weights, p: float):
        super().__init__()
        self.weight = nn.Parameter(w.weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(w.bias.clone(), requires_grad=False) if w.bias is not None else None
        self.lora_A = nn.Parameter(w.lora_A.clone())
        self.lora_B = nn.Parameter(w.lora_B.clone())
        self.scaling, self.p = w.scaling, p

    def forward(self, x):
        lora = F.linear(F.linear(F.dropout(x.to(self.lora_A.dtype), self.p, self.training), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + (lora * self.scaling).to(x.dtype)


def _frozen_linear(w: Weights) -> nn.Linear:
    N, K = w.weight.shape
    linear = nn.Linear(K, N, bias=w.bias is not None, device=w.weight.device, dtype=w.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.weight)
        if w.bias is not None:
            linear.bias.copy_(w.bias)
    return linear.requires_grad_(False)


def _peft_layer(w: Weights, r: int, p: float, four_bit: bool = False) -> nn.Module:
    """PEFT's LoRA layer over the frozen nn.Linear of ``w`` (``four_bit``: its ``bnb.Linear4bit`` layer over
    ``linear_4bit(w)``), with ``w``'s adapters."""
    import peft

    if four_bit:
        base = linear_4bit(w)  # first: it says so clearly when bitsandbytes is missing
        from peft.tuners.lora.bnb import Linear4bit as layer_class
    else:
        base = _frozen_linear(w)
        from peft.tuners.lora import Linear as layer_class
    config = peft.LoraConfig(r=r, lora_alpha=w.scaling * r, lora_dropout=p)
    layer = layer_class(base, "default", config=config, r=r, lora_alpha=w.scaling * r)
    with torch.no_grad():
        # The adapters take the dtype the sweep gives every provider (fp32 with
        # half-precision bases is PEFT's own default).
        for adapter, value in ((layer.lora_A["default"], w.lora_A), (layer.lora_B["default"], w.lora_B)):
            adapter.to(value.dtype)
            adapter.weight.copy_(value)
    assert layer.scaling["default"] == w.scaling
    return layer


def build(provider: str, w: Weights, r: int, p: float) -> tuple[nn.Module, str]:
    """(module in training mode, backend label). Raises NotImplementedError where a provider does not apply."""
    device = w.weight.device
    if provider == "linear":
        return _frozen_linear(w).train(), ""
    if provider in ("fused_lora", "fused_lora_torch"):
        layer = _fused_layer(w, r, p)
        layer.backend = "torch" if provider == "fused_lora_torch" else None
        return layer.train(), backend_name_for(device, layer.backend)
    if provider == "peft":
        return _peft_layer(w, r, p).train(), ""
    if provider == "peft_bf16":
        if w.weight.dtype not in (torch.float16, torch.bfloat16):
            raise NotImplementedError("adapters already in the base dtype (same as peft)")
        base_dtype = Weights(w.weight, w.bias, w.lora_A.to(w.weight.dtype), w.lora_B.to(w.weight.dtype), w.scaling)
        return _peft_layer(base_dtype, r, p).train(), ""
    if provider == "eager_composite":
        return EagerComposite(w, p).train(), ""
    if provider == "peft_compile":
        # NOTE: the GPU timer replays backward with retain_graph=True, which compiled
        # backwards refuse while they donate buffers.
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
        return torch.compile(_peft_layer(w, r, p).train(), dynamic=True), "inductor"
    if provider == "addmm_composite":
        if p > 0:
            raise NotImplementedError("no dropout (as Unsloth)")
        return AddmmComposite(w).train(), ""
    if provider == "linear_nf4":
        return linear_4bit(w).train(), ""
    if provider == "fused_lora_nf4":
        return _fused_layer(w, r, p, linear_4bit(w)).train(), backend_name_for(device, None)
    if provider == "peft_nf4":
        return _peft_layer(w, r, p, four_bit=True).train(), ""
    raise ValueError(f"provider: expected one of {ALL_PROVIDERS}, got {provider!r}")


def linear_4bit(w: Weights, quant_type: str = "nf4") -> nn.Module:
    """A frozen bitsandbytes ``Linear4bit`` quantized from ``w``'s weight (NF4, double quantization, the
    weight's dtype as compute dtype), bias as it is."""
    from fused_lora.quantized import require_bitsandbytes

    bnb = require_bitsandbytes()
    N, K = w.weight.shape
    layer = bnb.nn.Linear4bit(K, N, bias=w.bias is not None, compute_dtype=w.weight.dtype, quant_type=quant_type)
    layer.weight.data = w.weight.detach().clone()
    if w.bias is not None:
        layer.bias = nn.Parameter(w.bias.detach().clone(), requires_grad=False)
    return layer.to(w.weight.device).requires_grad_(False)  # .to() quantizes


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of a provider's frozen base: its frozen parameters and, for a 4-bit weight, bitsandbytes'
    quantization statistics (absmax, double quantization, code books)."""
    total, seen = 0, set()
    for param in module.parameters():
        if param.requires_grad or param.untyped_storage().data_ptr() in seen:
            continue
        seen.add(param.untyped_storage().data_ptr())
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def _fused_layer(w: Weights, r: int, p: float, base: nn.Module | None = None) -> fused_lora.FusedLoRALinear:
    """FusedLoRALinear over ``base`` (default: the frozen nn.Linear of ``w``) with ``w``'s adapters."""
    base = _frozen_linear(w) if base is None else base
    layer = fused_lora.FusedLoRALinear.from_linear(base, r=r, lora_alpha=w.scaling * r, lora_dropout=p)
    with torch.no_grad():
        layer.lora_A.data = w.lora_A.clone()
        layer.lora_B.data = w.lora_B.clone()
    return layer


def trainable_parameters(module: nn.Module) -> list[torch.Tensor]:
    return [q for q in module.parameters() if q.requires_grad]
