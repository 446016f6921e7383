"""torch.autocast: inputs cast like F.linear's, adapters kept in fp32, accuracy as good as PEFT's."""

import pytest
import torch
import torch.nn as nn

from fused_lora import FusedLoRALinear, fused_lora_linear, lora_linear_reference

from tolerances import lora_reductions, scaled_atol

peft = pytest.importorskip("peft")


def _layers(bias=True):
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias)
    from peft.tuners.lora import Linear as PeftLoraLinear
    config = peft.LoraConfig(r=8, lora_alpha=16)
    peft_layer = PeftLoraLinear(base, "default", config=config, r=8, lora_alpha=16)
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.3)
    ours = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return peft_layer, ours


def _run(layer, A, B, x, dy, autocast):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    grads = torch.autograd.grad(y, (x, A, B), dy.to(y.dtype))
    return (y,) + grads


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_autocast_on_cpu_is_as_accurate_as_peft(backend, bias):
    from fused_lora.ops.backends import _runs_on
    if not _runs_on(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend} is not built here")
    peft_layer, ours = _layers(bias)
    ours.backend = backend
    x = torch.randn(3, 11, 48)
    dy = torch.randn(3, 11, 40)
    mine = _run(ours, ours.lora_A, ours.lora_B, x, dy, autocast=True)
    theirs = _run(peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight, x, dy,
                  autocast=True)
    truth = _run(ours.double(), ours.lora_A, ours.lora_B, x.double(), dy.double(), autocast=False)
    ours.float()
    reductions = lora_reductions(T=33, K=48, N=40, r=8)
    # Dtypes follow F.linear under autocast: bf16 output; gradients in each tensor's own dtype.
    assert [t.dtype for t in mine] == [t.dtype for t in theirs] == [torch.bfloat16, torch.float32,
                                                                     torch.float32, torch.float32]
    for name, a, p, t in zip(("y", "dx", "dA", "dB"), mine, theirs, truth):
        err = (a.double() - t).abs().max().item()
        peft_err = (p.double() - t).abs().max().item()
        floor = scaled_atol(t, reductions[name], dtype=torch.float32)  # fp32 parts, where PEFT's error is ~0
        assert err <= 1.5 * peft_err + floor, f"{name}: error {err:.3g} vs PEFT's bf16 autocast error {peft_err:.3g}"
        assert err < 0.05 * t.abs().max().item(), name  # and really computed in (about) bf16 precision


def test_autocast_casts_what_f_linear_casts():
    torch.manual_seed(1)
    x, W, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora_linear(x, W, b, A, B, 0.5, backend="torch")
        assert y.dtype == torch.nn.functional.linear(x, W, b).dtype == torch.bfloat16
        # fp64 is not cast by autocast, so it runs in fp64.
        y64 = fused_lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5, backend="torch")
        assert y64.dtype == torch.float64
        # bf16 adapters are fine too.
        assert fused_lora_linear(x, W, b, A.bfloat16(), B.bfloat16(), 0.5, backend="torch").dtype == torch.bfloat16
    expected = lora_linear_reference(x.bfloat16().double(), W.bfloat16().double(), b.bfloat16().double(),
                                     A.double(), B.double(), 0.5)
    assert (y.double() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_triton_interpreter_refuses_bf16_autocast_clearly():
    from fused_lora.ops.backends import _runs_on
    if not _runs_on("triton", torch.device("cpu")):
        pytest.skip("triton cannot run CPU tensors here")
    layer = FusedLoRALinear(8, 4, r=2)
    layer.backend = "triton"
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="x: bfloat16 on CPU"):
        layer(torch.randn(3, 8))
