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


# --------------------------------------------------------------------------- modules a FusedLoRALinear cannot stand for

class _Half(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class _Tagged(nn.Linear):
    """A subclass that keeps nn.Linear.forward: a FusedLoRALinear computes what it does."""


def _hooked(kind):
    linear = nn.Linear(8, 6)
    if kind == "forward hook":
        linear.register_forward_hook(lambda module, args, out: out + 100)
    elif kind == "forward pre-hook":
        linear.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    elif kind == "backward hook":
        linear.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    elif kind == "patched forward":
        linear.forward = lambda x: nn.Linear.forward(linear, x) - 1
    elif kind == "subclass forward":
        linear = _Half(8, 6)
    return linear


@pytest.mark.parametrize("kind,reason", [
    ("subclass forward", "a subclass of torch.nn.Linear with its own forward"),
    ("patched forward", "forward patched on the instance"),
    ("forward hook", "1 forward hooks"),
    ("forward pre-hook", "1 forward pre-hooks"),
    ("backward hook", "1 backward hooks"),
])
def test_from_linear_refuses_what_it_would_not_compute(kind, reason):
    # Before: from_linear dropped the subclass's forward and the hooks, silently.
    linear = _hooked(kind)
    with pytest.raises(ValueError, match=f"linear: the module .*{reason}"):
        FusedLoRALinear.from_linear(linear, r=2)
    assert linear.weight.requires_grad  # untouched


def test_from_linear_takes_a_subclass_that_keeps_linear_forward():
    linear = _Tagged(8, 6)
    layer = FusedLoRALinear.from_linear(linear, r=2).eval()
    x = torch.randn(3, 8)
    assert_close_scaled("y", layer(x), linear(x), 8 + 2)


# --------------------------------------------------------------------------- adapter dtype (PEFT's autocast_adapter_dtype)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_are_fp32_on_half_bases_by_default(dtype):
    # Before: from_linear(bf16 linear) made bf16 adapters; PEFT makes fp32 ones.
    assert FusedLoRALinear(8, 6, dtype=dtype).lora_A.dtype == torch.float32
    layer = FusedLoRALinear.from_linear(nn.Linear(8, 6, dtype=dtype), r=2)
    assert (layer.weight.dtype, layer.lora_A.dtype, layer.lora_B.dtype) == (dtype, torch.float32, torch.float32)
    own = FusedLoRALinear.from_linear(nn.Linear(8, 6, dtype=dtype), r=2, adapter_dtype=dtype)
    assert (own.lora_A.dtype, own.lora_B.dtype) == (dtype, dtype)
    assert FusedLoRALinear(8, 6, dtype=dtype, adapter_dtype=torch.float32).lora_B.dtype == torch.float32
    for base, bad in ((dtype, torch.float64), (torch.float32, torch.float16), (torch.float64, torch.float32),
                      (dtype, "float32")):
        with pytest.raises(TypeError, match="adapter_dtype: expected None"):
            FusedLoRALinear(8, 6, dtype=base, adapter_dtype=bad)
    assert FusedLoRALinear(8, 6, dtype=torch.float64).lora_A.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters_on_half_inputs_match_the_reference_on_every_backend(device_backend, dtype):
    """y, dx, dA, dB of a half-precision layer with its default fp32 adapters, against the fp64 formula."""
    device, backend = device_backend
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter computes bf16 wrongly: refused (the fp16 case runs the same kernels).
        layer = FusedLoRALinear(8, 4, dtype=dtype)
        layer.backend = backend
        with pytest.raises(ValueError, match="bfloat16 on CPU is not supported by the triton backend"):
            layer(torch.randn(2, 8, dtype=dtype))
        return
    torch.manual_seed(0)
    T, K, N, r, p = 27, 40, 24, 8, 0.25
    layer = FusedLoRALinear(K, N, r=r, lora_alpha=16, lora_dropout=p, device=device, dtype=dtype).train()
    layer.backend = backend
    assert layer.lora_A.dtype == torch.float32
    nn.init.normal_(layer.lora_B, std=0.3)
    x = torch.randn(3, 9, K, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 9, N, device=device).to(dtype)
    torch.manual_seed(5)
    y = layer(x)
    dx, dA, dB = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    assert (y.dtype, dx.dtype, dA.dtype, dB.dtype) == (dtype, dtype, torch.float32, torch.float32)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64).item())
    mask = dropout_mask(seed, T, K, p, device)
    inputs = [t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B)]
    expected = lora_linear_reference(inputs[0], layer.weight.double(), layer.bias.double(), inputs[1], inputs[2],
                                     layer.scaling, keep_mask=mask, dropout_p=p)
    grads = torch.autograd.grad(expected, inputs, dy.double())
    n = lora_reductions(T, K, N, r)
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), (expected,) + grads):
        assert_close_scaled(name, got.double(), want, n[name], dtype=dtype)


# --------------------------------------------------------------------------- editing a merged adapter

def _merged_with_original():
    layer = _merged_layer()
    original = layer.weight.detach().clone()
    layer.merge()
    return layer, original


@pytest.mark.parametrize("edit", ["reset_lora_parameters", "scaling", "r", "lora_alpha", "use_rslora", "lora_A",
                                  "lora_B", "weight"])
def test_edits_of_a_merged_adapter_are_refused_and_unmerge_stays_exact(edit):
    # Before: merge(); reset_lora_parameters(); unmerge() left the weight 1.44 off the original,
    # merge(); scaling = 5.0; unmerge() 1.94 off.
    layer, original = _merged_with_original()
    merged_weight = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="merged into weight.*unmerge\\(\\) first"):
        if edit == "reset_lora_parameters":
            layer.reset_lora_parameters()
        elif edit in ("lora_A", "lora_B", "weight"):
            setattr(layer, edit, nn.Parameter(torch.zeros_like(getattr(layer, edit))))
        else:
            setattr(layer, edit, {"scaling": 5.0, "r": 2, "lora_alpha": 99, "use_rslora": True}[edit])
    assert torch.equal(layer.weight, merged_weight) and layer.scaling == 2.0 and layer.r == 4
    layer.unmerge()
    assert_close_scaled("unmerged weight", layer.weight, original, 4, magnitude_of=merged_weight)
    layer.scaling = 5.0  # fine once unmerged
    layer.reset_lora_parameters()


def test_in_place_edits_of_a_merged_adapter_are_caught_and_unmerge_subtracts_what_merge_added():
    layer, original = _merged_with_original()
    merged_weight = layer.weight.detach().clone()
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer.lora_B.mul_(3.0)
    with pytest.raises(RuntimeError, match="changed in place while the adapter is merged"):
        layer(x)
    layer.unmerge()
    assert_close_scaled("unmerged weight", layer.weight, original, 4, magnitude_of=merged_weight)
    # The layer now computes with the edited adapter.
    expected = lora_linear_reference(x, original, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert_close_scaled("y", layer(x), expected, 32 + 4)
    # An edit through .data escapes the version counter; unmerge() is exact all the same.
    layer.merge()
    layer.lora_A.data.mul_(-2.0)
    layer.unmerge()
    assert_close_scaled("unmerged weight", layer.weight, original, 4, magnitude_of=merged_weight)


def test_a_merged_layer_moved_or_cast_still_runs_and_unmerges():
    layer, original = _merged_with_original()
    x = torch.randn(5, 32, dtype=torch.float64)
    layer.double()
    assert layer.merged_lora_A.dtype == torch.float64
    assert layer(x).dtype == torch.float64  # the cast changed no value of the adapter: no false alarm
    layer.unmerge()
    assert_close_scaled("unmerged weight", layer.weight.float(), original, 4 * 32)


def test_load_state_dict_keeps_weight_and_adapter_consistent():
    layer, original = _merged_with_original()
    merged_weight = layer.weight.detach().clone()
    adapter_only = {"lora_A": torch.randn(4, 32), "lora_B": torch.randn(16, 4)}
    with pytest.raises(RuntimeError, match="the adapter is merged into weight.*'lora_A', 'lora_B'"):
        layer.load_state_dict(adapter_only, strict=False)
    assert torch.equal(layer.weight, merged_weight) and not torch.equal(layer.lora_A, adapter_only["lora_A"])
    with pytest.raises(RuntimeError, match="merged"):
        layer.load_state_dict({"weight": original}, strict=False)
    layer.unmerge()
    layer.load_state_dict(adapter_only, strict=False)  # fine once unmerged
    assert torch.equal(layer.lora_A, adapter_only["lora_A"])
    # A state that says merged, without the weight it was merged into: refused too.
    with pytest.raises(RuntimeError, match="the state says merged"):
        layer.load_state_dict({"_extra_state": torch.tensor(True), **adapter_only}, strict=False)
    assert not layer.merged
    # A whole merged state: its adapter is what unmerge() subtracts (also with assign=True, and
    # into a layer that is merged itself).
    source, source_original = _merged_with_original()
    for assign in (False, True):
        layer.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=assign)
        assert layer.merged
        layer.unmerge()
        assert_close_scaled("unmerged weight", layer.weight, source_original, 4, magnitude_of=source.weight)
        layer.merge()
