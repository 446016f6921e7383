"""fused_lora_linear / FusedLoRAFunction against the eager reference, on every backend."""

import pytest
import torch
import torch.utils.checkpoint

import fused_lora
from fused_lora import dropout_mask, fused_lora_linear, lora_linear_reference
from fused_lora.ops.backends import backend_name_for
from fused_lora.saved_tensors import saved_tensor_bytes

from conftest import OUTPUT_NAMES, make_inputs, run_forward_backward
from tolerances import assert_close_scaled, lora_reductions, scaled_atol

SCALING = 0.75

# (T, K, N, r, batch_shape, bias): none of T, K, N a multiple of the blocks, plus aligned ones.
SHAPES = [
    (1, 1, 1, 1, None, True),
    (37, 70, 45, 3, None, True),
    (130, 64, 33, 16, None, False),
    (20, 24, 50, 1, None, True),
    (33, 40, 24, 64, (3, 11), True),
    (65, 128, 96, 8, (5, 13), False),
]
SHAPE_IDS = [f"T{s[0]}-K{s[1]}-N{s[2]}-r{s[3]}{'-3d' if s[4] else ''}{'' if s[5] else '-nobias'}"
             for s in SHAPES]

# (x dtype, adapter dtype): fp32; fp16 with fp16 adapters; fp16 with fp32 adapters (PEFT's default).
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16-fp32adapters"]
CUDA_ONLY_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _upcast(t):
    return None if t is None else t.detach().to(torch.float64)


def check_against_reference(device, backend, shape, dtype, adapter_dtype, p, seed=1234):
    T, K, N, r, batch_shape, bias = shape
    x, weight, b, lora_A, lora_B = make_inputs(T, K, N, r, dtype, device, bias=bias,
                                               adapter_dtype=adapter_dtype, batch_shape=batch_shape)
    rows = x.numel() // K
    dy = torch.randn(*x.shape[:-1], N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = dropout_mask(seed, rows, K, p) if p > 0 else None

    def fused(x_, a_, b_):
        return fused_lora_linear(x_, weight, b, a_, b_, SCALING, p, seed=seed, backend=backend)

    def reference(weight_, bias_):
        def fn(x_, a_, b_):
            return lora_linear_reference(x_, weight_, bias_, a_, b_, SCALING, keep_mask=mask, dropout_p=p)
        return fn

    actual = run_forward_backward(fused, x, lora_A, lora_B, dy.to(device, dtype))
    truth = run_forward_backward(reference(_upcast(weight), _upcast(b)), _upcast(x), _upcast(lora_A),
                                 _upcast(lora_B), dy.to(device))
    if dtype == torch.float32:
        for name, a, t in zip(OUTPUT_NAMES, actual, truth):
            assert a.dtype == (dtype if name in ("y", "dx") else adapter_dtype), name
            assert_close_scaled(name, a.double(), t, lora_reductions(rows, K, N, r)[name], dtype=dtype)
        return
    # Half precision: the kernel's error against an fp64 truth must be at most a
    # small multiple of the error of the eager same-dtype reference.
    eager = run_forward_backward(reference(weight, b), x, lora_A, lora_B, dy.to(device, dtype))
    for name, a, e, t in zip(OUTPUT_NAMES, actual, eager, truth):
        assert a.dtype == e.dtype, name
        err = (a.double() - t).abs().max().item()
        eager_err = (e.double() - t).abs().max().item()
        floor = scaled_atol(t, lora_reductions(rows, K, N, r)[name], dtype=dtype)
        assert err <= 3 * eager_err + floor, (
            f"{name}: max error {err:.3g} vs eager {dtype} error {eager_err:.3g} (floor {floor:.3g}); "
            f"worst at index {tuple(int(i) for i in torch.unravel_index((a.double() - t).abs().argmax(), t.shape))}")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(device_backend, shape, dtype, adapter_dtype, p):
    device, backend = device_backend
    check_against_reference(device, backend, shape, dtype, adapter_dtype, p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on CUDA only (the interpreter's bf16 is wrong)")
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype,adapter_dtype", CUDA_ONLY_DTYPES, ids=["bf16", "bf16-fp32adapters"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_bf16_cuda(backend, dtype, adapter_dtype, p):
    for shape in SHAPES:
        check_against_reference(torch.device("cuda"), backend, shape, dtype, adapter_dtype, p)


def _non_contiguous_inputs(T, K, device):
    gen = torch.Generator().manual_seed(3)
    return {
        "transposed": torch.randn(K, T, generator=gen).to(device).t(),
        "strided-columns": torch.randn(T, 2 * K, generator=gen).to(device)[:, ::2],
        "row-padded": torch.randn(T, 2 * K, generator=gen).to(device)[:, K:],
        "3d-permuted": torch.randn(3, T // 3, K, generator=gen).to(device).transpose(0, 1),
    }


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_x(device_backend, p):
    device, backend = device_backend
    T, K, N, r = 24, 40, 36, 5
    _, weight, b, lora_A, lora_B = make_inputs(T, K, N, r, torch.float32, device)
    for kind, x in _non_contiguous_inputs(T, K, device).items():
        assert not x.is_contiguous(), kind
        dy = torch.randn(*x.shape[:-1], N, device=device)
        mask = dropout_mask(5, T, K, p) if p > 0 else None
        actual = run_forward_backward(
            lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 2.0, p, seed=5, backend=backend),
            x, lora_A, lora_B, dy)
        expected = run_forward_backward(
            lambda x_, a_, b_: lora_linear_reference(x_, weight, b, a_, b_, 2.0, keep_mask=mask, dropout_p=p),
            x.contiguous(), lora_A, lora_B, dy)
        for name, a, e in zip(OUTPUT_NAMES, actual, expected):
            assert_close_scaled(f"{kind} {name}", a, e, lora_reductions(T, K, N, r)[name])


def _non_contiguous_parameters(K, N, r, device):
    """(weight, bias, lora_A, lora_B) laid out as views: expanded (stride 0) or strided."""
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return {
        "expanded-bias": (rand(N, K), rand(1).expand(N), rand(r, K), rand(N, r)),
        "strided-bias": (rand(N, K), rand(3 * N)[1::3], rand(r, K), rand(N, r)),
        "expanded-weight": (rand(1, K).expand(N, K), rand(N), rand(r, K), rand(N, r)),
        "strided-all": (rand(N, 2 * K)[:, ::2], rand(2 * N)[::2], rand(K, r).t(), rand(r, N).t()),
        "expanded-adapters": (rand(N, K), rand(N), rand(1, K).expand(r, K), rand(N, 1).expand(N, r)),
    }


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_weight_bias_and_adapters(device_backend, p):
    # The triton kernels once read an expanded or strided bias as if it were contiguous (wrong y).
    device, backend = device_backend
    T, K, N, r = 12, 20, 18, 3
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(6)).to(device)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(7)).to(device)
    mask = dropout_mask(5, T, K, p) if p > 0 else None
    for kind, (weight, b, lora_A, lora_B) in _non_contiguous_parameters(K, N, r, device).items():
        actual = run_forward_backward(
            lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 1.5, p, seed=5, backend=backend),
            x, lora_A, lora_B, dy)
        expected = run_forward_backward(
            lambda x_, a_, b_: lora_linear_reference(x_, weight.contiguous(), b.contiguous(), a_, b_, 1.5,
                                                     keep_mask=mask, dropout_p=p),
            x, lora_A.contiguous(), lora_B.contiguous(), dy)
        for name, a, e in zip(OUTPUT_NAMES, actual, expected):
            assert_close_scaled(f"{kind} {name}", a, e, lora_reductions(T, K, N, r)[name])


@pytest.mark.parametrize("batch_shape", [(2, 3), (2, 1, 3), ()], ids=["3d", "4d", "1d"])
def test_output_of_any_rank_can_be_modified_in_place(device_backend, batch_shape):
    # As nn.Linear's: `y += residual` or ReLU(inplace=True) on the output. The torch and triton
    # backends once returned a view made inside the autograd Function for x of rank != 2, which
    # autograd refuses to modify in place ("Output 0 of FusedLoRAFunction is a view ...").
    device, backend = device_backend
    K, N, r = 10, 8, 3
    _, weight, b, lora_A, lora_B = make_inputs(4, K, N, r, torch.float32, device)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(*batch_shape, K, generator=gen).to(device)
    residual = torch.randn(*batch_shape, N, generator=gen).to(device)
    dy = torch.randn(*batch_shape, N, generator=gen).to(device)

    def in_place(linear):
        def fn(x_, a_, b_):
            y = linear(x_, a_, b_)
            y += residual
            return torch.relu_(y)
        return fn

    actual = run_forward_backward(
        in_place(lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 2.0, 0.2, seed=3, backend=backend)),
        x, lora_A, lora_B, dy)
    mask = dropout_mask(3, x.numel() // K, K, 0.2)
    expected = run_forward_backward(
        in_place(lambda x_, a_, b_: lora_linear_reference(x_, weight, b, a_, b_, 2.0, keep_mask=mask, dropout_p=0.2)),
        x, lora_A, lora_B, dy)
    rows = x.numel() // K
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert a.shape == e.shape, name
        assert_close_scaled(name, a, e, lora_reductions(rows, K, N, r)[name])


@pytest.mark.parametrize("K", [8, 5])
def test_gradcheck_float64_with_dropout(device_backend, K):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(4, K, 6, 2, torch.float64, device)
    inputs = tuple(t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 1.5, 0.4, seed=77, backend=backend),
        inputs, fast_mode=True)


def test_base_weight_and_bias_get_no_gradient(device_backend):
    device, backend = device_backend
    layer = fused_lora.FusedLoRALinear(16, 12, r=4, lora_dropout=0.1, device=device)
    layer.backend = backend
    torch.nn.init.normal_(layer.lora_B)
    layer(torch.randn(5, 16, device=device, requires_grad=True)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_same_seed_bit_identical_different_seed_different(device_backend):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(40, 32, 24, 4, torch.float32, device)
    dy = torch.randn(40, 24, device=device)

    def run(seed):
        return run_forward_backward(
            lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 1.0, 0.5, seed=seed, backend=backend),
            x, lora_A, lora_B, dy)

    first, again, other = run(3), run(3), run(4)
    for name, a, c in zip(OUTPUT_NAMES, first, again):
        assert torch.equal(a, c), f"{name} differs between two runs with the same seed"
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("trainable", [("x",), ("lora_A",), ("lora_B",), ("x", "lora_B"), ("lora_A", "lora_B")])
def test_only_requested_gradients(device_backend, trainable):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(20, 24, 16, 3, torch.float32, device)
    full = run_forward_backward(
        lambda x_, a_, b_: fused_lora_linear(x_, weight, b, a_, b_, 1.0, 0.2, seed=8, backend=backend),
        x, lora_A, lora_B, torch.ones(20, 16, device=device))
    named = {"x": x.clone(), "lora_A": lora_A.clone(), "lora_B": lora_B.clone()}
    for name in trainable:
        named[name].requires_grad_(True)
    y = fused_lora_linear(named["x"], weight, b, named["lora_A"], named["lora_B"], 1.0, 0.2, seed=8,
                          backend=backend)
    grads = torch.autograd.grad(y, [named[n] for n in trainable], torch.ones_like(y))
    index = {"x": 1, "lora_A": 2, "lora_B": 3}
    for name, g in zip(trainable, grads):
        assert_close_scaled(name, g, full[index[name]],
                            lora_reductions(20, 24, 16, 3)[{"x": "dx", "lora_A": "dA", "lora_B": "dB"}[name]])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_memory_contract_saved_for_backward(device_backend, p):
    device, backend = device_backend
    T, K, N, r = 96, 64, 48, 16
    layer = fused_lora.FusedLoRALinear(K, N, r=r, lora_dropout=p, device=device)
    layer.backend = backend
    x = torch.randn(T, K, device=device, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())
    # x itself, xa (T, r) fp32, the seed, and for the triton backend's default "bits" mask
    # mode the packed keep mask: 1 bit per element of x.
    bits = T * ((K + 7) // 8) if fused_lora.ops.backends.saves_keep_bits(backend, p, x.dtype) else 0
    limit = x.numel() * x.element_size() + T * r * 4 + bits + 64
    assert saved <= limit, f"saved {saved} bytes for backward, contract allows {limit}"
    # The saved state is really x itself (no copy) plus xa.
    assert saved >= x.numel() * x.element_size()


def test_frozen_lora_A_does_not_save_x(device_backend):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(64, 32, 16, 4, torch.float32, device)
    lora_B.requires_grad_(True)
    saved = saved_tensor_bytes(
        lambda: fused_lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.1, seed=1, backend=backend),
        exclude=(weight, lora_A, lora_B))
    assert saved <= 64 * 4 * 4 + 4096


def test_eval_mode_applies_no_dropout(device_backend):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(30, 24, 20, 4, torch.float32, device)
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 2.0, 0.5, seed=3, training=False, backend=backend)
    assert_close_scaled("y", y, lora_linear_reference(x, weight, b, lora_A, lora_B, 2.0), lora_reductions(30, 24, 20, 4)["y"])


def test_seed_none_follows_torch_manual_seed(device_backend):
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(30, 24, 20, 4, torch.float32, device)

    def run():
        return fused_lora_linear(x, weight, b, lora_A, lora_B, 2.0, 0.5, backend=backend)

    torch.manual_seed(11)
    first = run()
    second = run()
    torch.manual_seed(11)
    assert torch.equal(first, run())
    assert not torch.equal(first, second)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(device_backend, use_reentrant):
    device, backend = device_backend
    layer = fused_lora.FusedLoRALinear(24, 20, r=4, lora_dropout=0.5, device=device)
    layer.backend = backend
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(30, 24, device=device, requires_grad=True)

    def grads(checkpointed):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant)
        else:
            y = layer(x)
        (y * y).sum().backward()
        return x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    for name, a, e in zip(("dx", "dA", "dB"), grads(True), grads(False)):
        assert torch.equal(a, e), f"{name} differs under checkpointing"


def test_empty_batch(device_backend):
    device, backend = device_backend
    _, weight, b, lora_A, lora_B = make_inputs(1, 8, 6, 2, torch.float32, device)
    x = torch.randn(0, 8, device=device, requires_grad=True)
    A = lora_A.clone().requires_grad_(True)
    y = fused_lora_linear(x, weight, b, A, lora_B, 1.0, 0.1, seed=1, backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(A.grad, torch.zeros_like(A))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("road", ["fused_lora_linear", "FusedLoRAFunction"])
def test_second_derivatives_raise_instead_of_missing_terms(device_backend, road, p):
    """create_graph=True: first derivatives as usual; differentiating them again raises.

    The kernels build no graph, so a second derivative through the layer would silently
    miss every term that passes through it. The C++ node (cpu backend, fused_lora_linear)
    and the Python Function both give their gradients a grad_fn that raises instead.
    """
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(9, 12, 10, 3, torch.float64, device, batch_shape=(3, 3))
    for t in (x, lora_A, lora_B):
        t.requires_grad_(True)

    def forward():
        if road == "FusedLoRAFunction":
            name = backend_name_for(x.device, backend)
            return fused_lora.FusedLoRAFunction.apply(x, weight, b, lora_A, lora_B, 0.5, p, 7 if p else None, name)
        return fused_lora_linear(x, weight, b, lora_A, lora_B, 0.5, p, seed=7, backend=backend)

    y = forward()
    loss = (y * y).sum()  # dy depends on y: a graph a second derivative could follow
    first = torch.autograd.grad(loss, (x, lora_A, lora_B))
    y = forward()
    grads = torch.autograd.grad((y * y).sum(), (x, lora_A, lora_B), create_graph=True)
    for name, g, f in zip(("dx", "dA", "dB"), grads, first):
        assert torch.equal(g.detach(), f), name
        assert g.requires_grad, name
    for target in (lora_A, lora_B, x):
        with pytest.raises(RuntimeError, match="first derivatives only"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), target, retain_graph=True)


def test_second_derivatives_with_lora_A_frozen_raise_at_once(device_backend):
    """lora_A frozen: x is not saved, so d(dB)/dx could not be linked; create_graph=True raises in backward."""
    device, backend = device_backend
    x, weight, b, lora_A, lora_B = make_inputs(8, 12, 10, 3, torch.float64, device)
    x.requires_grad_(True)
    lora_B.requires_grad_(True)
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 0.5, 0.3, seed=7, backend=backend)
    with pytest.raises(RuntimeError, match="lora_A frozen, x is not saved"):
        torch.autograd.grad(y.sum(), (x, lora_B), create_graph=True)
    # Without create_graph the same call is an ordinary backward.
    y = fused_lora_linear(x, weight, b, lora_A, lora_B, 0.5, 0.3, seed=7, backend=backend)
    dx, dB = torch.autograd.grad(y.sum(), (x, lora_B))
    assert dx.shape == x.shape and dB.shape == lora_B.shape
