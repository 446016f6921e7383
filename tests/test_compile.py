"""torch.compile: the custom ops trace with no graph break and compiled runs match eager."""

import warnings

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn

import fused_lora
from fused_lora import FusedLoRALinear, apply_lora, fused_lora_linear

from tolerances import assert_close_scaled
from tiny_models import tiny_llama, token_batch


class TwoLayers(nn.Module):
    def __init__(self, p, backend):
        super().__init__()
        self.first = FusedLoRALinear(16, 24, r=4, lora_alpha=8, lora_dropout=p)
        self.second = FusedLoRALinear(24, 8, r=3, lora_dropout=p, bias=False)
        for layer in (self.first, self.second):
            nn.init.normal_(layer.lora_B)
            layer.backend = backend

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _run(model, x):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    y = model(x)
    (y * y).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return [y.detach()] + [g.clone() for g in grads]


def test_custom_ops_have_fake_implementations():
    with torch._subclasses.FakeTensorMode():
        x, A, B, W = torch.empty(7, 5), torch.empty(3, 5), torch.empty(6, 3), torch.empty(6, 5)
        seed = torch.zeros((), dtype=torch.int64)
        xa, bits = torch.ops.fused_lora.lora_shrink(x, A, seed, 0.1, "torch")
        assert xa.shape == (7, 3) and xa.dtype == torch.float32 and bits.shape == (0,)
        y = torch.ops.fused_lora.lora_forward(x.half(), W.half(), None, B, xa, 2.0, "torch")
        assert y.shape == (7, 6) and y.dtype == torch.float16
        dx, dA, dB = torch.ops.fused_lora.lora_backward(torch.empty(7, 6), x, W, A, B, xa, 2.0, seed, 0.1, bits,
                                                         True, False, True, "torch")
        assert (dx.shape, dA.shape, dB.shape) == ((7, 5), (0,), (6, 3))
        # The triton backend saves the packed keep mask (its default "bits" mode): 1 bit per element.
        _, bits = torch.ops.fused_lora.lora_shrink(x, A, seed, 0.1, "triton")
        expected = (7, 1) if fused_lora.ops.backends.TRITON_MASK_MODE == "bits" else (0,)
        assert bits.shape == expected and bits.dtype == torch.uint8


def test_compiled_graphs_hold_the_custom_ops():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    recorder = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(TwoLayers(0.3, "torch").train(), backend=recorder, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(compiled, torch.randn(4, 16))

    def ops(graphs):
        return {str(n.target) for g in graphs for n in g.graph.nodes if "fused_lora" in str(n.target)}

    assert ops(recorder.fw_graphs) == {"fused_lora.lora_shrink.default", "fused_lora.lora_forward.default"}
    assert ops(recorder.bw_graphs) == {"fused_lora.lora_backward.default"}


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_graph_breaks(device_backend, p):
    device, backend = device_backend
    model = TwoLayers(p, backend).to(device).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, 16, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert any("FusedLoRAFunction" in op or "autograd_function_apply" in op for op in ops), ops


def test_no_graph_breaks_in_a_transformers_llama_with_lora():
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=4, lora_dropout=0.1).train()
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = "torch"
    explanation = torch._dynamo.explain(model)(token_batch())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_matches_eager_forward_and_backward(device_backend):
    device, backend = device_backend
    torch.manual_seed(0)
    model = TwoLayers(0.0, backend).to(device)
    x = torch.randn(3, 7, 16, device=device)
    eager = _run(model, x)
    torch._dynamo.reset()
    compiled = _run(torch.compile(model), x)
    for name, a, e in zip(["y", "dx", "first.lora_A", "first.lora_B", "second.lora_A", "second.lora_B"],
                          compiled, eager):
        assert_close_scaled(name, a, e, 21 + 16 + 24 + 8)  # the longest chain of sums in these layers


def _seeded_layer_runs(device, backend, p):
    """fn(x, A, B) of one fused layer with a fixed seed, and run(f) -> [y, dx, dA, dB] of (y**2).sum()."""
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 20, device=device), torch.randn(12, device=device)
    A, B, x = torch.randn(4, 20, device=device), torch.randn(12, 4, device=device), torch.randn(9, 20, device=device)

    def fn(x_, a_, b_):
        return fused_lora_linear(x_, weight, bias, a_, b_, 0.5, p, seed=1234, backend=backend)

    def run(f):
        inputs = [t.clone().requires_grad_(True) for t in (x, A, B)]
        y = f(*inputs)
        y.pow(2).sum().backward()
        return [y.detach()] + [t.grad for t in inputs]

    return fn, run


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_and_compiled_roads_are_bit_identical(device_backend, p):
    # Eager calls go Function -> launchers; compiled ones Function -> custom ops -> the same
    # launchers and plans. Same seed, same inputs: the same bits.
    device, backend = device_backend
    fn, run = _seeded_layer_runs(device, backend, p)
    torch._dynamo.reset()
    for name, a, e in zip(("y", "dx", "dA", "dB"), run(torch.compile(fn, backend="aot_eager", fullgraph=True)),
                          run(fn)):
        assert torch.equal(a, e), f"{name} differs between the compiled and the eager road"


def test_compiled_dropout_with_explicit_seed_matches_eager():
    fn, run = _seeded_layer_runs(torch.device("cpu"), "torch", 0.4)
    torch._dynamo.reset()
    for name, a, e in zip(("y", "dx", "dA", "dB"), run(torch.compile(fn)), run(fn)):
        assert_close_scaled(name, a, e, 21 + 16 + 24 + 8)  # the longest chain of sums in these layers


@torch._inductor.config.patch(fallback_random=True)
def test_compiled_seed_draw_follows_torch_manual_seed():
    # With fallback_random, inductor draws from torch's generator exactly as eager does:
    # the compiled model must then drop the same elements as the eager one.
    # NOTE: config.patch, not monkeypatch: monkeypatch's undo deletes the setting from the
    # config module, and every later compile then fails ("fallback_random does not exist").
    model = TwoLayers(0.5, "torch").train()
    x = torch.randn(6, 16)
    torch.manual_seed(21)
    eager = _run(model, x)
    torch._dynamo.reset()
    compiled_model = torch.compile(model)
    torch.manual_seed(21)
    compiled = _run(compiled_model, x)
    for name, a, e in zip(["y", "dx", "A1", "B1", "A2", "B2"], compiled, eager):
        assert_close_scaled(name, a, e, 21 + 16 + 24 + 8)  # the longest chain of sums in these layers
    again = _run(compiled_model, x)  # the next call draws a new seed
    assert not torch.equal(again[0], compiled[0])
    assert fused_lora.FusedLoRAFunction is not None


def test_compiled_calls_check_the_seed_tensor_as_eager_calls_do(device_backend):
    # Before: under torch.compile the torch backend ran a negative seed tensor with the mask of
    # seed 2**64 - 5, while eager raised.
    device, backend = device_backend
    torch.manual_seed(0)
    x, A, B = torch.randn(9, 20, device=device), torch.randn(4, 20, device=device), torch.randn(12, 4, device=device)
    weight = torch.randn(12, 20, device=device)

    def layer(x_, seed):
        return fused_lora_linear(x_, weight, None, A, B, 0.5, 0.3, seed=seed, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    good = compiled(x, torch.tensor(7))
    assert torch.equal(good, layer(x, torch.tensor(7)))
    for seed in (torch.tensor(-5), torch.tensor(-2 ** 63)):
        with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*63\), got tensor\(-"):
            layer(x, seed)
        with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*63\), got tensor\(-"):
            compiled(x, seed)
    # and through the Function's backward (the seed saved for it is checked as well)
    x = x.requires_grad_(True)
    with pytest.raises(ValueError, match="seed"):
        compiled(x, torch.tensor(-1)).sum().backward()


def test_the_backend_of_a_compiled_function_is_fixed_when_traced(monkeypatch):
    """As fused_lora_linear's docstring says: FUSED_LORA_BACKEND set after tracing changes eager
    calls, not the compiled code; a changed backend= argument (FusedLoRALinear.backend) recompiles,
    and so does torch.compiler.reset()."""
    import fused_lora.function
    import fused_lora.ops.custom_ops
    from fused_lora.ops.backends import ENV_VAR

    seen = []
    original = fused_lora.ops.custom_ops.backend_ops

    def recording(name):
        seen.append(name)
        return original(name)

    monkeypatch.setattr(fused_lora.ops.custom_ops, "backend_ops", recording)
    monkeypatch.setattr(fused_lora.function, "backend_ops", recording)
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 8, r=4)
    x = torch.randn(5, 16)
    monkeypatch.setenv(ENV_VAR, "torch")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    compiled(x)
    assert set(seen) == {"torch"}
    monkeypatch.setenv(ENV_VAR, "triton")
    seen.clear()
    compiled(x)
    assert set(seen) == {"torch"}, "the compiled code kept the backend it was traced with"
    seen.clear()
    layer(x)
    assert set(seen) == {"triton"}, "eager calls follow the variable"
    seen.clear()
    layer.backend = "torch"
    compiled(x)
    assert set(seen) == {"torch"}
    layer.backend = None
    torch.compiler.reset()
    seen.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    compiled(x)
    assert set(seen) == {"triton"}, "a fresh trace reads the variable again"
