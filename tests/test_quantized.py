"""4-bit frozen bases (bitsandbytes NF4 / FP4): read in place, dequantized bit-exactly, fused like a dense base.

Against the real bitsandbytes 0.50.2: its ``dequantize_4bit`` (bit for bit, every backend and ISA
level), an fp64 eager reference built from it (y, dx, dA, dB), and its layouts and refusals.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import FusedLoRAFunction, FusedLoRALinear, dropout_mask, fused_lora_linear, lora_linear_reference
from fused_lora.ops.backends import _runs_on
from fused_lora.quantized import Weight4bit, buffer_bytes, dequantize, release_buffers, weight_4bit
from fused_lora.saved_tensors import saved_tensor_bytes

from tiny_models import linear_4bit
from tolerances import assert_close_scaled, lora_reductions

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if _runs_on(b, torch.device("cpu"))]
HALF = (torch.float16, torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same_bits(name, got, expected, quant_type="nf4"):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.dtype, got.shape)
    if quant_type == "fp4":
        # NOTE: FP4's nibble 8 is a signed zero: +0.0 from the code book (here, and bitsandbytes' PyTorch
        # path), -0.0 from bitsandbytes' C++ CPU kernel. Equal values; every other element bit for bit.
        zeros = expected == 0
        assert torch.equal(got[zeros], expected[zeros].abs()) or torch.equal(got[zeros].abs(), expected[zeros].abs())
        got, expected = got[~zeros], expected[~zeros]
    mismatch = (_bits(got) != _bits(expected)).view(-1, got.element_size()).any(dim=1)
    assert not mismatch.any(), (f"{name}: {int(mismatch.sum())} of {got.numel()} elements differ, first at flat "
                                f"index {int(mismatch.nonzero()[0])}")


# ---------------------------------------------------------------------------------------------
# Reading a Params4bit in place, and dequantizing it
# ---------------------------------------------------------------------------------------------

def _runs_dtype(backend, dtype) -> bool:
    # NOTE: the triton backend on CPU tensors runs in Triton's interpreter, which computes bf16 wrongly (the
    # suite tests bf16 Triton kernels on CUDA only; tests/test_dequant_4bit.py).
    return not (backend == "triton" and torch.bfloat16 in dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_is_bit_exact_against_bitsandbytes(quant_type, nested, dtype):
    layer = linear_4bit(96, 192, quant_type=quant_type, nested=nested, dtype=dtype, seed=3)
    weight = layer.weight
    expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    assert expected.dtype == dtype
    for backend in CPU_BACKENDS:
        if _runs_dtype(backend, (dtype,)):
            _assert_same_bits(f"{backend} {dtype}", dequantize(weight, backend=backend), expected, quant_type)
        # Another compute dtype: bitsandbytes' result cast, as its matmul does (dequantize_4bit(...).to(x.dtype)).
        for other in (torch.float32, torch.bfloat16, torch.float64):
            if _runs_dtype(backend, (dtype, other)):
                _assert_same_bits(f"{backend} {dtype}->{other}", dequantize(weight, other, backend=backend),
                                  expected.to(other), quant_type)


def test_weight_4bit_reads_the_params4bit_in_place():
    layer = linear_4bit(40, 64, nested=True)
    weight, state = layer.weight, layer.weight.quant_state
    w4 = weight_4bit(weight)
    assert w4.packed.data_ptr() == weight.data_ptr() and w4.packed.dtype == torch.uint8
    assert w4.absmax.data_ptr() == state.absmax.data_ptr() and w4.code is state.code and w4.offset is state.offset
    assert w4.nested_absmax is state.state2.absmax and w4.nested_code is state.state2.code
    assert (w4.shape, w4.blocksize, w4.nested_blocksize, w4.quant_type, w4.dtype) == (
        (40, 64), 64, 256, "nf4", torch.float32)
    assert weight_4bit(w4) is w4
    round_trip = Weight4bit.from_parts(w4.tensors(), w4.meta())
    assert torch.equal(dequantize(round_trip), dequantize(w4))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16-storage", "fp32-storage"])
def test_quant_storage_other_than_uint8_is_the_same_bytes(storage):
    layer = linear_4bit(32, 64, quant_storage=storage, seed=5)
    assert layer.weight.dtype == storage
    expected = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert weight_4bit(layer.weight).packed.data_ptr() == layer.weight.data_ptr()
    for backend in CPU_BACKENDS:
        _assert_same_bits(backend, dequantize(layer.weight, backend=backend), expected)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (8, 96), (2, 48), (33, 100), (5, 130)])
def test_awkward_shapes_match_bitsandbytes_pytorch_dequantize(shape, blocksize):
    """Blocks straddling rows, partial last blocks, an odd element count: against bitsandbytes' own PyTorch
    dequantization (what it runs for an odd in_features, and on devices without a kernel).

    NOTE: bitsandbytes 0.50.2's C++ CPU kernel gets some of these shapes wrong (e.g. 8x96 and 2x48 with
    blocksize 64: errors of several times the weights' size, checked below), so it is not the reference here.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    torch.manual_seed(sum(shape) + blocksize)
    dense = torch.randn(*shape)
    for nested in (False, True):
        packed, state = bnb_functional.quantize_4bit(dense, blocksize=blocksize, compress_statistics=nested,
                                                     quant_type="nf4")
        weight = bnb.nn.Params4bit(packed, quant_state=state, blocksize=blocksize, quant_type="nf4",
                                   bnb_quantized=True)
        absmax = state.absmax if not nested else (
            bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset)
        expected = _dequantize_4bit_compute(packed.view(-1), absmax, _get_4bit_code("nf4", "cpu"), blocksize,
                                            shape, torch.float32)
        for backend in CPU_BACKENDS:
            _assert_same_bits(f"{backend} {shape}", dequantize(weight, backend=backend), expected)
        # A quantization error within half the widest gap of the NF4 code book (0.304) times the absmax, plus
        # the double quantization's error of the absmax: a weight-sized error is a bug.
        error = (dequantize(weight) - dense).abs().max().item()
        assert error <= 0.25 * dense.abs().max().item(), error


def _random_weight_4bit(numel_rows, cols, blocksize, nested, quant_type, seed):
    """A Weight4bit of random bytes and statistics (no bitsandbytes needed): every nibble, every code entry."""
    gen = torch.Generator().manual_seed(seed)
    numel = numel_rows * cols
    blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=gen, dtype=torch.uint8)
    code = torch.randn(16, generator=gen)
    if nested:
        absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
        return Weight4bit(packed, (numel_rows, cols), blocksize, quant_type, code, absmax, True,
                          torch.randn(256, generator=gen), torch.rand(-(-blocks // 256), generator=gen) * 3,
                          256, torch.tensor(0.37), torch.float32)
    return Weight4bit(packed, (numel_rows, cols), blocksize, quant_type, code, torch.rand(blocks, generator=gen) * 5,
                      dtype=torch.float32)


CHECK_ISA = """
import torch
from fused_lora.ops import cpu_ops, torch_ops
import test_quantized as t
assert cpu_ops.ISA == {isa!r}, cpu_ops.ISA
for rows, cols, blocksize, nested in [(7, 33, 64, True), (64, 64, 64, False), (3, 1000, 256, True), (129, 70, 32, False)]:
    w4 = t._random_weight_4bit(rows, cols, blocksize, nested, "nf4", rows)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = torch_ops.dequantize_4bit(w4, torch.empty(rows, cols, dtype=dtype))
        got = cpu_ops.dequantize_4bit(w4, torch.empty(rows, cols, dtype=dtype))
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (rows, cols, dtype)
torch.save(t._tiled_gemm_results(), {path!r})
print("ok")
"""


def _tiled_gemm_results():
    """(out, expected fp64, n) of the cpu backend's tiled 4-bit GEMMs (_C.gemm_4bit), both directions, on
    random 4-bit weights: row and column counts that leave tails in every ISA level's register blocks."""
    from fused_lora.ops import cpu_ops

    results = []
    for rows, N, K, blocksize, nested in [(1, 37, 64, 64, True), (5, 19, 128, 32, False), (9, 16, 768, 256, True),
                                          (18, 33, 320, 64, False)]:
        w4 = _random_weight_4bit(N, K, blocksize, nested, "nf4", rows)
        dense = dequantize(w4, torch.float64, backend="torch")
        gen = torch.Generator().manual_seed(rows)
        for transposed in (True, False):
            a = torch.randn(rows, K if transposed else N, generator=gen)
            start = torch.randn(rows, N if transposed else K, generator=gen)
            out = cpu_ops._gemm_4bit(a, w4, start.clone(), transposed)
            expected = start.double() + (a.double() @ (dense.t() if transposed else dense))
            results.append((out, expected, K if transposed else N))
    return results


@pytest.mark.skipif(not _runs_on("cpu", torch.device("cpu")), reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_dequantize_and_tiled_gemm_on_every_isa_level(isa, tmp_path):
    """The C++ loops of every ISA level (FUSED_LORA_ISA caps it, read once per process): the dequantization
    bit for bit against the torch backend, the tiled GEMMs against fp64, and bit-identical between avx2 and
    avx512 (same summation order, FMA on both); a level above this CPU's is not tested."""
    from fused_lora.ops import cpu_ops

    from fused_lora import _C  # type: ignore[attr-defined]

    levels = ["baseline", "avx2", "avx512"]
    if levels.index(isa) > levels.index(_C.cpu_isa()):
        pytest.skip(f"this CPU's best level is {_C.cpu_isa()}")
    path = str(tmp_path / "gemm.pt")
    if isa == cpu_ops.ISA:
        exec(CHECK_ISA.format(isa=isa, path=path), {"__name__": "check"})
    else:
        env = dict(os.environ, FUSED_LORA_ISA=isa, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        result = subprocess.run([sys.executable, "-c", CHECK_ISA.format(isa=isa, path=path)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    results = torch.load(path)
    for index, (out, expected, n) in enumerate(results):
        assert_close_scaled(f"gemm {index}", out.double(), expected, n + 1, dtype=torch.float32)
    if isa == "avx2" and cpu_ops.ISA == "avx512":
        for index, ((out, _, _), (here, _, _)) in enumerate(zip(results, _tiled_gemm_results())):
            assert torch.equal(out, here), f"gemm {index}: avx2 and avx512 differ"


def test_dequantize_buffer_is_reused_and_owned_by_the_package():
    layer = linear_4bit(48, 64)
    A, B = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1
    x = torch.randn(5, 64)
    release_buffers()
    fused_lora_linear(x, layer.weight, None, A, B, 1.0, backend="torch")
    held = buffer_bytes()
    assert held == 48 * 64 * 4  # one fp32 buffer of the weight's size
    for _ in range(3):
        fused_lora_linear(x, layer.weight, None, A, B, 1.0, backend="torch")
    assert buffer_bytes() == held  # reused, not grown
    release_buffers()
    assert buffer_bytes() == 0


# ---------------------------------------------------------------------------------------------
# The fused op on a 4-bit base
# ---------------------------------------------------------------------------------------------

def _adapters(K, N, r, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(r, K, generator=gen) * K ** -0.5).to(dtype), (torch.randn(N, r, generator=gen) * 0.3).to(dtype))


def _fp64_reference(x, weight, bias, A, B, scaling, keep, p, dy):
    """y, dx, dA, dB of the eager formula in fp64, W from bitsandbytes' dequantize_4bit in x's dtype."""
    dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(x.dtype).double()
    xs, As, Bs = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y = lora_linear_reference(xs, dense, None if bias is None else bias.double(), As, Bs, scaling,
                              keep_mask=keep, dropout_p=p)
    return [y.detach()] + list(torch.autograd.grad(y, (xs, As, Bs), dy.double()))


# NOTE: no bf16 for the triton backend on CPU: Triton's interpreter computes bf16 wrongly, and the backend
# refuses it there (tests/test_ops.py); it runs bf16 on CUDA.
BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in (torch.float32, torch.bfloat16, torch.float16)
                  if not (b == "triton" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_outputs_and_gradients_match_an_fp64_reference(backend, dtype, quant_type, nested):
    T, K, N, r, p, scaling, seed = 19, 128, 72, 5, 0.2, 1.5, 4321
    layer = linear_4bit(N, K, quant_type=quant_type, nested=nested, dtype=dtype, seed=7)
    A, B = _adapters(K, N, r, torch.float32 if dtype in HALF else dtype)
    x = torch.randn(T, K).to(dtype).requires_grad_(True)
    dy = torch.randn(T, N).to(dtype)
    bias = layer.bias.to(dtype)
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = fused_lora_linear(x, layer.weight, bias, A_, B_, scaling, p, seed=seed, backend=backend)
    got = [y] + list(torch.autograd.grad(y, (x, A_, B_), dy))
    expected = _fp64_reference(x, layer.weight, bias, A, B, scaling, dropout_mask(seed, T, K, p), p, dy)
    reductions = lora_reductions(T, K, N, r)
    for name, g, e, want in zip(("y", "dx", "dA", "dB"), got, expected, (dtype, dtype, A.dtype, B.dtype)):
        assert g.dtype == want, (name, g.dtype)
        assert_close_scaled(name, g.double(), e, reductions[name], dtype=dtype)


@pytest.mark.skipif(not _runs_on("cpu", torch.device("cpu")), reason="the C++ extension is not built")
@pytest.mark.parametrize("T", [1, 7, 64, 65])
def test_cpu_backend_tiles_few_rows_and_buffers_more(T, monkeypatch):
    """Up to MAX_ROWS_4BIT_TILED fp32 rows the cpu backend's base GEMMs dequantize tile by tile; above, into the
    buffer. Both compute the reference's outputs and gradients."""
    from fused_lora.ops import cpu_ops

    calls = []
    real = cpu_ops._gemm_4bit
    monkeypatch.setattr(cpu_ops, "_gemm_4bit", lambda *args: calls.append(args[-1]) or real(*args))
    K, N, r, p = 192, 37, 3, 0.25
    layer = linear_4bit(N, K, nested=T % 2 == 1, seed=T)
    A, B = _adapters(K, N, r, torch.float32, seed=T)
    x = torch.randn(T, K, requires_grad=True)
    dy = torch.randn(T, N)
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = fused_lora_linear(x, layer.weight, layer.bias, A_, B_, 0.7, p, seed=5, backend="cpu")
    got = [y] + list(torch.autograd.grad(y, (x, A_, B_), dy))
    assert calls == ([True, False] if T <= cpu_ops.MAX_ROWS_4BIT_TILED else [])
    expected = _fp64_reference(x, layer.weight, layer.bias, A, B, 0.7, dropout_mask(5, T, K, p), p, dy)
    reductions = lora_reductions(T, K, N, r)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close_scaled(name, g.double(), e, reductions[name], dtype=torch.float32)


def test_function_and_layer_take_a_params4bit():
    layer4 = linear_4bit(40, 64, seed=2)
    A, B = _adapters(64, 40, 3, torch.float32)
    x = torch.randn(2, 3, 64)
    expected = lora_linear_reference(x, layer4.weight, layer4.bias, A, B, 2.0)
    # lora_linear_reference itself: the dense dequantized weight, then the formula.
    dense = bnb_functional.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state)
    assert torch.equal(expected, lora_linear_reference(x, dense, layer4.bias, A, B, 2.0))
    n = lora_reductions(6, 64, 40, 3)["y"]
    for backend in CPU_BACKENDS:
        y = FusedLoRAFunction.apply(x.reshape(6, 64), layer4.weight, layer4.bias, A, B, 2.0, 0.0, None, backend)
        assert_close_scaled(f"Function {backend}", y.view(2, 3, 40), expected, n)
    module = FusedLoRALinear.from_linear(layer4, r=3, lora_alpha=6)
    assert module.weight is layer4.weight and module.is_4bit and module.lora_A.dtype == torch.float32
    with torch.no_grad():
        module.lora_A.copy_(A)
        module.lora_B.copy_(B)
    assert_close_scaled("module", module(x), expected, n)
    assert "base=nf4 (4-bit)" in repr(module)
    with pytest.raises(RuntimeError, match="4-bit"):
        module.merge()


def test_autocast_dequantizes_to_the_autocast_dtype():
    layer4 = linear_4bit(32, 64, seed=10)
    A, B = _adapters(64, 32, 3, torch.float32)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora_linear(x, layer4.weight, layer4.bias, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    expected = lora_linear_reference(x.bfloat16().double(), dequantize(layer4.weight, torch.bfloat16).double(),
                                     layer4.bias.bfloat16().double(), A.double(), B.double(), 1.0)
    assert_close_scaled("y", y.double(), expected, lora_reductions(5, 64, 32, 3)["y"], dtype=torch.bfloat16)


def test_layer_casts_a_bias_of_another_dtype_as_linear4bit_does():
    layer4 = linear_4bit(32, 64, dtype=torch.float32, seed=9)  # fp32 bias
    module = FusedLoRALinear.from_linear(layer4, r=2).eval()
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = module(x)
    expected = lora_linear_reference(x, layer4.weight, layer4.bias.to(torch.bfloat16), module.lora_A,
                                     module.lora_B, module.scaling)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), expected.float(), atol=5e-2, rtol=2e-2)


def test_dropout_mask_contract_on_a_4bit_base():
    """The mask of a seeded call is dropout_mask(seed, T, K, p), on a 4-bit base as on a dense one."""
    layer4 = linear_4bit(24, 64, seed=11)
    A, B = _adapters(64, 24, 4, torch.float32)
    x = torch.randn(9, 64)
    dense = dequantize(layer4.weight)
    for backend in CPU_BACKENDS:
        got = fused_lora_linear(x, layer4.weight, None, A, B, 1.0, 0.5, seed=99, backend=backend)
        on_dense = fused_lora_linear(x, dense, None, A, B, 1.0, 0.5, seed=99, backend=backend)
        expected = lora_linear_reference(x, dense, None, A, B, 1.0, keep_mask=dropout_mask(99, 9, 64, 0.5),
                                         dropout_p=0.5)
        assert_close_scaled(backend, got, expected, lora_reductions(9, 64, 24, 4)["y"])
        assert_close_scaled(backend + " vs dense", got, on_dense, lora_reductions(9, 64, 24, 4)["y"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_dense_copy_of_the_weight_is_saved_for_backward(backend):
    T, K, N, r = 6, 256, 192, 4
    layer4 = linear_4bit(N, K, seed=12)
    A, B = (t.requires_grad_(True) for t in _adapters(K, N, r, torch.float32))
    x = torch.randn(T, K, requires_grad=True)
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_lora_linear(x, layer4.weight, None, A, B, 1.0, 0.1, seed=1, backend=backend)
    packed_storage = layer4.weight.untyped_storage().data_ptr()
    for t in seen:
        if t.untyped_storage().data_ptr() == packed_storage:
            assert t.numel() * t.element_size() == N * K // 2  # the Params4bit's own bytes, by reference
            continue
        assert t.numel() < N * K // 8, f"a saved tensor of shape {tuple(t.shape)} ({t.dtype})"
    state = layer4.weight.quant_state
    statistics = sum(q.numel() * q.element_size() for q in (state.absmax, state.code, state.state2.absmax,
                                                            state.state2.code, state.offset))
    saved = saved_tensor_bytes(lambda: fused_lora_linear(x, layer4.weight, None, A, B, 1.0, 0.1, seed=1,
                                                         backend=backend),
                               exclude=[layer4.weight, A, B])
    dense_saved = saved_tensor_bytes(lambda: fused_lora_linear(x, dequantize(layer4.weight), None, A, B, 1.0, 0.1,
                                                               seed=1, backend=backend),
                                     exclude=[A, B])
    # What a dense base saves (x, xa; its weight is a parameter) plus the quantization statistics, at most.
    assert saved <= dense_saved - N * K * 4 + statistics, (saved, dense_saved, statistics)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_packed_bytes_and_quant_state_are_unchanged_by_training():
    layer4 = linear_4bit(64, 128, seed=13)
    state = layer4.weight.quant_state
    before = [t.clone() for t in (layer4.weight.data, state.absmax, state.code, state.state2.absmax,
                                  state.state2.code, state.offset)]
    module = FusedLoRALinear.from_linear(layer4, r=4, lora_alpha=8, lora_dropout=0.1).train()
    nn.init.normal_(module.lora_B)
    lora_before = module.lora_A.detach().clone()
    optimizer = torch.optim.AdamW([module.lora_A, module.lora_B], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        module(torch.randn(8, 128)).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(module.lora_A, lora_before)
    assert module.weight is layer4.weight and layer4.weight.quant_state is state
    after = (layer4.weight.data, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset)
    for name, b, a in zip(("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"), before, after):
        assert torch.equal(b, a), f"{name} changed"
    assert not layer4.weight.requires_grad and layer4.weight.grad is None


def test_state_dict_round_trip_of_a_4bit_layer():
    module = FusedLoRALinear.from_linear(linear_4bit(32, 64, seed=14), r=2, lora_alpha=4)
    nn.init.normal_(module.lora_B)
    state = module.state_dict()
    assert {"weight.absmax", "weight.quant_map", "weight.nested_absmax"} <= set(state)
    fresh = FusedLoRALinear.from_linear(linear_4bit(32, 64, seed=15), r=2, lora_alpha=4)
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), module(x))
    assert torch.equal(fresh.weight.data, module.weight.data) and fresh.weight is not module.weight


def test_compile_road_has_no_graph_break_and_no_dense_weight_between_forward_and_backward():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    N, K = 48, 64
    layer4 = linear_4bit(N, K, seed=16)
    A, B = _adapters(K, N, 3, torch.float32)

    backend = "cpu" if _runs_on("cpu", torch.device("cpu")) else "torch"

    def fn(x_, a_, b_):
        return fused_lora_linear(x_, layer4.weight, layer4.bias, a_, b_, 0.5, 0.3, seed=77, backend=backend)

    def run(f):
        inputs = [t.clone().requires_grad_(True) for t in (torch.randn(7, K, generator=torch.Generator().manual_seed(0)),
                                                            A, B)]
        y = f(*inputs)
        y.pow(2).sum().backward()
        return [y.detach()] + [t.grad for t in inputs]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(torch.randn(7, K), A, B)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    recorder = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = run(torch.compile(fn, backend=recorder, fullgraph=True))
    for name, a, e in zip(("y", "dx", "dA", "dB"), compiled, run(fn)):
        assert torch.equal(a, e), f"{name} differs between the compiled and the eager road"
    ops = {str(n.target) for g in recorder.fw_graphs + recorder.bw_graphs for n in g.graph.nodes}
    assert {"fused_lora.lora_forward_4bit.default", "fused_lora.lora_backward_4bit.default"} <= ops, ops
    for graph in recorder.bw_graphs:  # what the backward receives: no dense (N, K) weight
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val")
                assert value is None or value.numel() < N * K // 2 or value.dtype == torch.uint8, (
                    node.name, tuple(value.shape))


# ---------------------------------------------------------------------------------------------
# What is refused, and how
# ---------------------------------------------------------------------------------------------

def test_8bit_bases_are_refused_naming_the_type():
    linear8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    with pytest.raises(ValueError, match="Linear8bitLt"):
        FusedLoRALinear.from_linear(linear8)
    with pytest.raises(ValueError, match="Int8Params"):
        fused_lora_linear(torch.randn(2, 64), linear8.weight, None, torch.randn(2, 64), torch.randn(32, 2), 1.0)
    with pytest.raises(ValueError, match="Linear8bitLt"):
        fused_lora.apply_lora(nn.Sequential(linear8), ["0"])


def test_unquantized_params4bit_and_linear4bit_subclasses_are_refused():
    unquantized = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # not moved to a device: not quantized yet
    with pytest.raises(ValueError, match="not quantized yet"):
        FusedLoRALinear.from_linear(unquantized)

    class Patched(bnb.nn.Linear4bit):
        def forward(self, x):
            return super().forward(x) * 2

    patched = Patched(64, 32, quant_type="nf4").to("cpu")
    with pytest.raises(ValueError, match="its own forward, a patched forward or forward hooks"):
        FusedLoRALinear.from_linear(patched)


@pytest.mark.parametrize("register", [nn.Module.register_full_backward_hook, nn.Module.register_full_backward_pre_hook],
                         ids=["backward-hook", "backward-pre-hook"])
def test_a_linear4bit_with_backward_hooks_is_refused_like_a_linear(register):
    # Before: from_linear and apply_lora took it, and the FusedLoRALinear replacing it dropped the hooks silently
    # (an nn.Linear with the same hooks was refused).
    layer4 = linear_4bit(32, 64, seed=9)
    register(layer4, lambda *args: None)
    with pytest.raises(ValueError, match="linear: the module has 1 backward (pre-)?hooks"):
        FusedLoRALinear.from_linear(layer4)
    with pytest.raises(ValueError, match="target_modules: module '0' has 1 backward (pre-)?hooks"):
        fused_lora.apply_lora(nn.Sequential(layer4), ["0"])
    model = nn.Sequential(layer4, linear_4bit(32, 32, seed=10))
    fused_lora.apply_lora(model, "all-linear")  # skips it, takes the plain one
    assert model[0] is layer4 and isinstance(model[1], FusedLoRALinear) and model[1].is_4bit


def test_the_cpu_inference_repacking_is_refused_clearly():
    """bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel (eval mode, an input that
    needs no grad): another layout, which fused_lora refuses by name (and PEFT's forward handles)."""
    layer4 = linear_4bit(64, 128, seed=17)
    data, state = bnb_functional._convert_weight_packed_for_cpu(layer4.weight.data, layer4.weight.quant_state)
    layer4.weight.data, layer4.weight.quant_state = data, state
    assert state.packing_format_for_cpu
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        fused_lora_linear(torch.randn(2, 128), layer4.weight, None, torch.randn(2, 128), torch.randn(64, 2), 1.0)
    with pytest.raises(ValueError, match="repacked"):
        FusedLoRALinear.from_linear(layer4)


WITHOUT_BITSANDBYTES = r"""
import importlib.machinery, subprocess, sys

class _Hidden(importlib.machinery.PathFinder):
    '''bitsandbytes as if it were not installed: not found, for imports and for find_spec.'''
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            return None
        return super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _Hidden
import importlib.util
assert importlib.util.find_spec("bitsandbytes") is None
import torch, fused_lora
from fused_lora.quantized import require_bitsandbytes
layer = fused_lora.FusedLoRALinear(16, 8, r=2)
layer(torch.randn(3, 16)).sum().backward()
model = fused_lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(16, 8)), ["0"], r=2)
model(torch.randn(2, 16))
import peft
pm = fused_lora.from_peft(peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                                              peft.LoraConfig(r=2, target_modules=["0"])))
pm(torch.randn(2, 16))
assert "bitsandbytes" not in sys.modules
try:
    require_bitsandbytes()
except ImportError as error:
    print("IMPORT ERROR:", error)
from fused_lora.memory import main
main(["--params", "7e9", "--dtype", "nf4"])
from bench import cli
try:
    cli.main(["--base", "nf4", "--quick", "--no-e2e", "--device", "cpu"])
except SystemExit as exit_:
    print("BENCH EXIT:", exit_.code)
"""


def test_without_bitsandbytes_everything_else_works_and_4bit_paths_name_the_extra():
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", WITHOUT_BITSANDBYTES], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "IMPORT ERROR: fused_lora: 4-bit (QLoRA) bases need bitsandbytes (bitsandbytes==0.50.2); install the " \
           "extra with `pip install .[qlora]`" in out, out
    assert "3.61 GB" in out
    assert "BENCH EXIT: --base nf4: fused_lora: 4-bit (QLoRA) bases need bitsandbytes" in out, out
