"""The triton backend's 4-bit dequantize (kernels/triton/dequant_4bit.py, fused_lora/ops/triton_ops/dequant.py)
against bitsandbytes' own ``dequantize_4bit`` of the same bytes: bit for bit.

Weights are quantized by bitsandbytes itself (``Params4bit``, as ``Linear4bit`` holds them) and
read through a stand-in with the field names of the contract's ``Weight4bit``. On CPU the kernel
runs in the Triton interpreter (fp16 and fp32: the interpreter gets bf16 wrong); with a GPU, every
dtype is compared with bitsandbytes' CUDA kernel.
"""

import collections
import copy
import gc
import os
import pathlib
import subprocess
import sys
import weakref

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes import functional as bnb_functional  # noqa: E402

from fused_lora.ops.triton_ops import dequantize_4bit  # noqa: E402
from fused_lora.ops.triton_ops.dequant import _DEQUANT_PLANS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU tensors run the Triton kernels only under "
                                                                "TRITON_INTERPRET=1 (CUDA present: see the CUDA test)")

Weight4bit = collections.namedtuple(
    "Weight4bit", "packed shape blocksize quant_type code absmax nested nested_code nested_absmax "
                  "nested_blocksize offset dtype")

# (shape, blocksize): odd N*K (the last byte's low nibble is padding), a single partial block,
# whole blocks, K % blocksize != 0 with K % 16 == 0, more than 256 blocks (two nested absmax
# blocks), and bitsandbytes' largest blocksize with a partial second block.
CASES = [((33, 70), 64), ((1, 63), 64), ((128, 64), 64), ((5, 48), 32), ((130, 130), 64), ((17, 257), 4096)]


def weight_of(packed, state):
    """The contract's fields, read in place from a bitsandbytes packed tensor and its QuantState."""
    nested = state.nested
    return Weight4bit(packed, tuple(state.shape), state.blocksize, state.quant_type, state.code, state.absmax, nested,
                      state.state2.code if nested else None, state.state2.absmax if nested else None,
                      state.state2.blocksize if nested else None, state.offset if nested else None, state.dtype)


def quantized(shape, blocksize, quant_type, nested, seed=0, scale=1.0, quant_storage=torch.uint8):
    """A bitsandbytes ``Params4bit`` (quantized on CPU, as ``Linear4bit.to("cpu")`` does) and its dense source."""
    dense = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    param = bnb.nn.Params4bit(dense.clone(), requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=quant_storage).to("cpu")
    assert param.bnb_quantized and param.quant_state.nested == nested
    return param


def bitsandbytes_dequantized(packed, state, dtype):
    """``bitsandbytes.functional.dequantize_4bit`` of the same bytes with ``state.dtype = dtype``.

    NOTE: on CPU it is called with the flattened shape (1, N*K). bitsandbytes 0.50.2's CPU
    kernel, on a CPU with AVX-512, indexes the absmax per row and is wrong when K % blocksize != 0
    while K % 16 == 0 (measured on this project's CI machine: shape (33, 80) at blocksize 64, errors
    up to 1.9); its CUDA kernel and the storage format are flat, so the flat call is the same
    quantity. On CUDA the real shape is used.
    """
    state = copy.copy(state)
    state.dtype = dtype
    shape = tuple(state.shape)
    if packed.device.type == "cpu":
        state.shape = torch.Size((1, shape[0] * shape[1]))
    return bnb_functional.dequantize_4bit(packed, state).reshape(shape)


def cuda_formula(packed, state, dtype):
    """bitsandbytes' CUDA kernel written out in torch: the fp32 code value (FP4: ``code[nibble & 7]``
    times the sign of bit 3, so 0b1000 gives -0.0) times the fp32 absmax, rounded once to dtype.
    (Its CPU kernels disagree on the sign of that zero between their own code paths.)"""
    shape = tuple(state.shape)
    n = shape[0] * shape[1]
    byte = packed.view(torch.uint8).reshape(-1).long()
    nibble = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n]
    code = state.code.to(packed.device)
    if state.quant_type == "fp4":
        value = code[nibble & 7] * torch.where(nibble >= 8, -1.0, 1.0).to(packed.device)
    else:
        value = code[nibble]
    absmax = state.absmax
    if state.nested:  # as bitsandbytes: 8-bit dequantize, then a separate fp32 add
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return (value * absmax.repeat_interleave(state.blocksize)[:n]).to(dtype).reshape(shape)


def assert_same_bits(name, actual, expected):
    """Bit for bit (so -0.0 != 0.0); the message shows the first mismatch and how many there are."""
    integer = {2: torch.int16, 4: torch.int32}[actual.element_size()]
    same = actual.view(integer) == expected.view(integer)
    if not bool(same.all()):
        where = tuple(int(i) for i in (~same).nonzero()[0])
        raise AssertionError(f"{name}: {int((~same).sum())} of {same.numel()} elements differ in their bits; first at "
                             f"{where}: got {actual[where].item()!r}, expected {expected[where].item()!r}")


def assert_equal_values(name, actual, expected):
    """torch.equal, with a message that shows where and by how much."""
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        where = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(f"{name}: {int((actual != expected).sum())} of {actual.numel()} elements differ; largest "
                             f"at {where}: got {actual[where].item()!r}, expected {expected[where].item()!r}")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=[f"{s[0]}x{s[1]}-bs{b}" for s, b in CASES])
def test_matches_bitsandbytes(shape, blocksize, quant_type, nested, dtype):
    param = quantized(shape, blocksize, quant_type, nested, seed=shape[0] * 1000 + shape[1])
    state = param.quant_state
    out = torch.empty(shape, dtype=dtype)
    result = dequantize_4bit(weight_of(param.data, state), out)
    assert result is out
    assert_equal_values("vs bitsandbytes.functional.dequantize_4bit", out,
                        bitsandbytes_dequantized(param.data, state, dtype))
    assert_same_bits("vs the CUDA formula", out, cuda_formula(param.data, state, dtype))


@needs_interpreter
def test_rounding_into_fp16_subnormals():
    """Tiny weights: fp16 outputs in the subnormal range and zeros, rounded as bitsandbytes rounds them."""
    param = quantized((40, 64), 64, "nf4", True, seed=3, scale=2e-6)
    out = torch.empty((40, 64), dtype=torch.float16)
    dequantize_4bit(weight_of(param.data, param.quant_state), out)
    subnormal = (out != 0) & (out.abs() < torch.finfo(torch.float16).tiny)
    assert int(subnormal.sum()) > 100
    assert_equal_values("fp16 subnormals", out, bitsandbytes_dequantized(param.data, param.quant_state, torch.float16))


@needs_interpreter
def test_reads_a_linear4bit_weight_in_place():
    """A real ``bnb.nn.Linear4bit``, its ``Params4bit`` itself as ``packed``: the bytes and the
    quantization state are read, never written."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(70, 33, bias=False, quant_type="nf4").to("cpu")
    state = layer.weight.quant_state
    before = [t.clone() for t in (layer.weight.data, state.absmax, state.code, state.offset, state.state2.absmax,
                                  state.state2.code)]
    out = torch.full((33, 70), float("nan"))
    dequantize_4bit(weight_of(layer.weight, state), out)
    after = (layer.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert_equal_values("Linear4bit weight", out, bitsandbytes_dequantized(layer.weight.data, state, torch.float32))


@needs_interpreter
@pytest.mark.parametrize("offset", ["float", "cpu tensor"])
def test_offset_from_the_host(offset):
    """The nested offset as a Python float (QuantState loaded from a dict) gives the same bits as the tensor."""
    param = quantized((33, 70), 64, "nf4", True, seed=5)
    state = param.quant_state
    expected = dequantize_4bit(weight_of(param.data, state), torch.empty((33, 70)))
    value = float(state.offset) if offset == "float" else state.offset
    weight = weight_of(param.data, state)._replace(offset=value)
    assert_same_bits("offset from the host", dequantize_4bit(weight, torch.empty((33, 70))), expected)


@needs_interpreter
def test_quant_storage_other_than_uint8():
    """``quant_storage=torch.bfloat16`` (FSDP's choice): the same bytes, read as uint8 without a copy."""
    param = quantized((16, 96), 64, "nf4", True, seed=7, quant_storage=torch.bfloat16)
    assert param.data.dtype == torch.bfloat16
    out = torch.empty((16, 96), dtype=torch.float16)
    dequantize_4bit(weight_of(param.data, param.quant_state), out)
    assert_equal_values("bf16 storage", out, bitsandbytes_dequantized(param.data, param.quant_state, torch.float16))


@needs_interpreter
@pytest.mark.parametrize("shape", [(0, 64), (64, 0)])
def test_empty_weight(shape):
    param_state = quantized((4, 64), 64, "nf4", False).quant_state
    weight = weight_of(torch.empty((0, 1), dtype=torch.uint8), param_state)._replace(
        shape=shape, absmax=torch.empty(0))
    out = torch.empty(shape)
    assert dequantize_4bit(weight, out) is out


@needs_interpreter
def test_plans_keep_no_tensor_alive():
    """The plan cache holds what depends on the signature only: no packed weight, no output buffer."""
    param = quantized((33, 70), 64, "fp4", True, seed=9)
    weight = weight_of(param.data, param.quant_state)
    out = torch.empty((33, 70), dtype=torch.float16)
    dequantize_4bit(weight, out)
    plans = len(_DEQUANT_PLANS)
    dequantize_4bit(weight, out)
    assert len(_DEQUANT_PLANS) == plans  # the same signature: no new plan
    refs = [weakref.ref(t) for t in (param, param.quant_state.absmax, param.quant_state.state2.absmax, out)]
    del param, weight, out
    gc.collect()
    assert all(ref() is None for ref in refs)


def _bad_arguments():
    """(label, change to the weight or out, exception, message fragment)."""
    def field(**changes):
        return lambda w, out: (w._replace(**changes), out)

    return [
        ("packed not a tensor", field(packed=[1, 2]), TypeError, "weight.packed: expected a torch.Tensor"),
        ("packed too short", lambda w, out: (w._replace(packed=w.packed[:-1]), out), ValueError, "weight.packed"),
        ("packed strided", lambda w, out: (w._replace(packed=torch.empty((1155, 2), dtype=torch.uint8)[:, :1]), out),
         ValueError, "not contiguous"),
        ("shape", field(shape=(33, 70, 1)), ValueError, "weight.shape"),
        ("blocksize", field(blocksize=48), ValueError, "weight.blocksize: expected one of"),
        ("quant_type", field(quant_type="int4"), ValueError, "weight.quant_type"),
        ("code", lambda w, out: (w._replace(code=w.code.double()), out), ValueError, "weight.code"),
        ("absmax fp32 when nested", lambda w, out: (w._replace(absmax=w.absmax.float()), out), ValueError,
         "weight.absmax"),
        ("nested_absmax length", lambda w, out: (w._replace(nested_absmax=torch.ones(2)), out), ValueError,
         "weight.nested_absmax"),
        ("nested_blocksize", field(nested_blocksize=0), ValueError, "weight.nested_blocksize"),
        ("offset fp64", lambda w, out: (w._replace(offset=w.offset.double()), out), ValueError, "weight.offset"),
        ("offset string", field(offset="0.1"), TypeError, "weight.offset"),
        ("out shape", lambda w, out: (w, out.t()), ValueError, "out: expected a contiguous"),
        ("out fp64", lambda w, out: (w, out.double()), ValueError, "out:"),
        ("out strided", lambda w, out: (w, torch.empty((70, 33)).t()), ValueError, "not contiguous"),
        ("out on meta", lambda w, out: (w, torch.empty((33, 70), device="meta")), ValueError, "device"),
        ("out not a tensor", lambda w, out: (w, None), TypeError, "out: expected a torch.Tensor"),
    ]


@needs_interpreter
@pytest.mark.parametrize("label,change,error,message", _bad_arguments(), ids=[c[0] for c in _bad_arguments()])
def test_bad_arguments(label, change, error, message):
    param = quantized((33, 70), 64, "nf4", True)
    weight, out = change(weight_of(param.data, param.quant_state), torch.empty((33, 70)))
    with pytest.raises(error, match=message):
        dequantize_4bit(weight, out)


_COMPILE_SCRIPT = """
import os, re
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_lora.kernels.dequant_4bit import _dequant_4bit_kernel
from fused_lora.ops.triton_ops.dequant import dequant_launch_options

constexprs, options = dequant_launch_options(64, "nf4", True, 256, True, 2)
types = dict(packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", nested_code_ptr="*fp32", nested_absmax_ptr="*fp32",
             offset_ptr="*fp32", out_ptr="*bf16", offset="fp32")
signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
             for name in _dequant_4bit_kernel.arg_names}
for fusion in (options["enable_fp_fusion"], True):
    compiled = triton.compile(ASTSource(fn=_dequant_4bit_kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(options, enable_fp_fusion=fusion))
    print(len(re.findall(r"\\bfma\\.", compiled.asm["ptx"])))
"""


def test_nested_absmax_compiles_without_fma_for_sm90():
    """The interpreter cannot show FMA contraction; the kernel compiled with the launcher's options must keep
    code2[q] * absmax2 + offset as two roundings (bitsandbytes computes them in two kernels). The control,
    compiled with contraction on, proves the check sees an FMA."""
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stderr[-4000:]
    launcher, control = (int(line) for line in result.stdout.split())
    assert launcher == 0, f"{launcher} fma instructions in the PTX compiled with the launcher's options"
    assert control > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (bitsandbytes' CUDA kernel is the reference)")
def test_matches_bitsandbytes_cuda():
    """Every dtype (bf16 included), bit for bit against bitsandbytes' CUDA dequantize of the same bytes."""
    cases = CASES + [((4096, 4096), 64), ((1024, 14336), 64)]
    grid = [(case, quant_type, nested) for case in cases for quant_type in ("nf4", "fp4") for nested in (False, True)]
    for (shape, blocksize), quant_type, nested in grid:
        param = quantized(shape, blocksize, quant_type, nested, seed=shape[0] + shape[1])
        state = copy.deepcopy(param.quant_state)
        state.to("cuda")
        packed = param.data.cuda()
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            label = f"{shape} bs={blocksize} {quant_type} nested={nested} {dtype}"
            out = torch.empty(shape, dtype=dtype, device="cuda")
            dequantize_4bit(weight_of(packed, state), out)
            assert_same_bits(label, out, bitsandbytes_dequantized(packed, state, dtype))
