"""FusedLoRALinear: PEFT semantics, from_linear, merge/unmerge, parity with the real PEFT layer."""

import math

import pytest
import torch
import torch.nn as nn

from fused_lora import FusedLoRALinear, dropout_mask, lora_linear_reference

from tolerances import assert_close_scaled, lora_reductions


def test_attributes_and_initialisation():
    layer = FusedLoRALinear(20, 12, r=4, lora_alpha=8, lora_dropout=0.1)
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.scaling, layer.merged) == (4, 8, 0.1, 2.0, False)
    assert layer.weight.shape == (12, 20) and layer.bias.shape == (12,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert isinstance(layer.lora_A, nn.Parameter) and layer.lora_A.requires_grad and layer.lora_A.shape == (4, 20)
    assert isinstance(layer.lora_B, nn.Parameter) and layer.lora_B.requires_grad and layer.lora_B.shape == (12, 4)
    assert torch.equal(layer.lora_B, torch.zeros(12, 4))
    # kaiming_uniform(a=sqrt(5)) on (r, in): bound = 1 / sqrt(in).
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(20) and layer.lora_A.abs().max() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert FusedLoRALinear(20, 12, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert FusedLoRALinear(20, 12, bias=False).bias is None


def test_dtype_and_device_arguments():
    layer = FusedLoRALinear(8, 4, r=2, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_computes_what_the_linear_did(bias, device_backend):
    device, backend = device_backend
    linear = nn.Linear(24, 10, bias=bias, device=device)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=16, lora_dropout=0.2)
    layer.backend = backend
    assert layer.weight is linear.weight and not linear.weight.requires_grad
    assert (layer.bias is linear.bias) if bias else layer.bias is None
    x = torch.randn(2, 7, 24, device=device)
    layer.eval()
    assert_close_scaled("y", layer(x), linear(x), 24 + 4)
    layer.train()  # B is zero, so dropout on the LoRA branch changes nothing either
    assert_close_scaled("y", layer(x), linear(x), 24 + 4)


def test_dropout_follows_training_flag(device_backend):
    device, backend = device_backend
    layer = FusedLoRALinear(16, 8, r=4, lora_dropout=0.5, device=device)
    layer.backend = backend
    nn.init.normal_(layer.lora_B)
    x = torch.randn(10, 16, device=device)
    expected_eval = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    layer.eval()
    assert_close_scaled("eval y", layer(x), expected_eval, 16 + 4)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_train, expected_eval, atol=1e-3)


def test_merge_unmerge_round_trip():
    layer = FusedLoRALinear(32, 16, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32)
    layer.eval()
    before = layer(x)
    original = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close_scaled("merged y", layer(x), before, 32 + 4)
    expected_weight = original + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    assert_close_scaled("merged weight", layer.weight, expected_weight, 4)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close_scaled("unmerged weight", layer.weight, original, 4, magnitude_of=expected_weight)
    assert_close_scaled("unmerged y", layer(x), before, 32 + 4)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def _peft_linear(base, r, lora_alpha, lora_dropout, use_rslora):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    return PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_parity_with_peft_lora_linear(device_backend, use_rslora, bias):
    device, backend = device_backend
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=bias, device=device)
    peft_layer = _peft_linear(base, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=use_rslora)
    nn.init.normal_(peft_layer.lora_B["default"].weight)
    ours = FusedLoRALinear(40, 24, r=8, lora_alpha=16, use_rslora=use_rslora, bias=bias, device=device)
    ours.backend = backend
    with torch.no_grad():
        ours.weight.copy_(base.weight)
        if bias:
            ours.bias.copy_(base.bias)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]

    x = torch.randn(3, 9, 40, device=device)
    dy = torch.randn(3, 9, 24, device=device)
    results = []
    for layer, a, b in ((peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight),
                        (ours, ours.lora_A, ours.lora_B)):
        x_ = x.clone().requires_grad_(True)
        y = layer(x_)
        results.append((y.detach(),) + torch.autograd.grad(y, (x_, a, b), dy))
    # NOTE: dA's entries reach a few hundred and some are near-cancellations: a per-element
    # tolerance failed on AVX2 machines (MKL sums in another order), a scaled one cannot.
    reductions = lora_reductions(T=27, K=40, N=24, r=8)
    for name, a, e in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
        assert_close_scaled(name, a, e, reductions[name])
    assert base.weight.grad is None


def test_dropout_matches_reference_with_the_public_mask(device_backend):
    device, backend = device_backend
    layer = FusedLoRALinear(24, 16, r=4, lora_dropout=0.3, device=device)
    layer.backend = backend
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 24, device=device)
    torch.manual_seed(123)
    y = layer(x)
    # The seed a call uses is the next draw from the default CPU generator.
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64).item())
    mask = dropout_mask(seed, 10, 24, 0.3)
    expected = lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                     keep_mask=mask, dropout_p=0.3)
    assert_close_scaled("y", y, expected, 24 + 4)


def _merged_layer():
    torch.manual_seed(0)
    layer = FusedLoRALinear(32, 16, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    return layer.eval()


def test_merged_state_loads_as_merged_and_is_not_counted_twice():
    layer = _merged_layer()
    x = torch.randn(5, 32)
    original = layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    state = layer.state_dict()
    assert state["_extra_state"].dtype == torch.bool and bool(state["_extra_state"])

    fresh = FusedLoRALinear(32, 16, r=4, lora_alpha=8).eval()
    fresh.load_state_dict(state)
    assert fresh.merged
    assert_close_scaled("y of the loaded merged layer", fresh(x), before, 32 + 4)
    fresh.unmerge()
    assert_close_scaled("unmerged loaded weight", fresh.weight, original, 4, magnitude_of=state["weight"])

    # And the other way: an unmerged state into a merged layer.
    layer.unmerge()
    merged_again = _merged_layer()
    merged_again.merge()
    merged_again.load_state_dict(layer.state_dict())
    assert not merged_again.merged
    assert_close_scaled("y", merged_again(x), before, 32 + 4)


def test_merged_state_survives_safetensors_and_bad_extra_state_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    layer = _merged_layer()
    layer.merge()
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = FusedLoRALinear(32, 16, r=4, lora_alpha=8)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    assert fresh.merged and torch.equal(fresh.weight, layer.weight)
    with pytest.raises(ValueError, match="extra state"):
        fresh.load_state_dict(dict(layer.state_dict(), _extra_state=torch.tensor([1.0])))


def test_training_a_merged_layer_is_a_clear_error():
    layer = _merged_layer()
    layer.merge()
    x = torch.randn(5, 32)
    layer.train()
    with pytest.raises(RuntimeError, match=r"merged into weight.*unmerge\(\)"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (5, 16)  # running it is fine
    layer.eval()
    assert layer(x).shape == (5, 16)
    layer.train()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    assert layer(x).shape == (5, 16)  # nothing of the adapter is trained
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    layer.unmerge()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
