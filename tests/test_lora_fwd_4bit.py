"""The optional fused 4-bit forward (kernels/triton/lora_fwd_4bit.py, fused_lora/ops/triton_ops/forward_4bit.py):
y = x W^T + b + scaling * xa B^T with W read as bitsandbytes' 4-bit bytes, against an fp64 eager formula
whose W is bitsandbytes' own ``dequantize_4bit`` of the same bytes, rounded to x's dtype.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from test_dequant_4bit import bitsandbytes_dequantized, needs_interpreter, quantized, weight_of  # noqa: E402
from tolerances import assert_close_scaled, lora_reductions  # noqa: E402

from fused_lora.ops.triton_ops import lora_forward_4bit  # noqa: E402

# (T, N, K, blocksize): the absmax per element (K % blocksize != 0, odd N*K); per column and K step
# (K % blocksize == 0), at blocksize 64 and 32; T over one 16-row tile.
CASES = [(5, 33, 70, 64), (16, 96, 128, 64), (3, 40, 96, 32), (20, 17, 130, 64)]


def reference(x, W, bias, lora_B, xa, scaling):
    y = x.double() @ W.double().T + scaling * (xa.double() @ lora_B.double().T)
    return y + bias.double() if bias is not None else y


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("T,N,K,blocksize", CASES, ids=[f"T{c[0]}-{c[1]}x{c[2]}-bs{c[3]}" for c in CASES])
def test_matches_the_dequantized_formula(T, N, K, blocksize, quant_type, nested, dtype):
    rank = 3
    param = quantized((N, K), blocksize, quant_type, nested, seed=T * 100 + K)
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(T, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if K % 2 == 0 else None
    lora_B = torch.randn(N, rank, generator=gen) / rank ** 0.5  # PEFT's default: fp32 adapters
    xa = torch.randn(T, rank, generator=gen)
    y = lora_forward_4bit(x, weight_of(param, param.quant_state), bias, lora_B, xa, 0.5)
    W = bitsandbytes_dequantized(param.data, param.quant_state, dtype)
    expected = reference(x, W, bias, lora_B, xa, 0.5)
    assert_close_scaled("y", y, expected.to(dtype), lora_reductions(T, K, N, rank)["y"], dtype=dtype)


@needs_interpreter
def test_fp32_adapters_keep_the_expand_in_fp32_range_on_a_16bit_input():
    # As in lora_forward's GEMM: fp32 adapters on an fp16 input take fp32 operands (a tf32 dot on a
    # GPU: fp32's range), so a scaled xa past fp16's 65504 times a small lora_B is a finite term.
    # Rounded to fp16 for the dot, as the kernel once did, it was Inf and so was y.
    T, N, K, rank = 5, 33, 128, 3
    param = quantized((N, K), 64, "nf4", True, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, K, generator=gen).half()
    lora_B = torch.randn(N, rank, generator=gen) * 1e-4
    xa = torch.randn(T, rank, generator=gen) * 3e5
    y = lora_forward_4bit(x, weight_of(param, param.quant_state), None, lora_B, xa, 0.5)
    W = bitsandbytes_dequantized(param.data, param.quant_state, torch.float16)
    expected = reference(x, W, None, lora_B, xa, 0.5)
    assert (xa * 0.5).abs().max() > torch.finfo(torch.float16).max
    assert torch.isfinite(y).all(), "the LoRA term overflowed fp16"
    assert_close_scaled("y", y, expected.to(torch.float16), lora_reductions(T, K, N, rank)["y"], dtype=torch.float16)


@needs_interpreter
def test_bad_operands_name_the_argument():
    param = quantized((33, 70), 64, "nf4", True)
    weight = weight_of(param, param.quant_state)
    x, lora_B, xa = torch.randn(4, 70), torch.randn(33, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="x2d: expected a 2-D"):
        lora_forward_4bit(torch.randn(4, 71), weight, None, lora_B, xa, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_forward_4bit(x, weight, None, torch.randn(32, 2), xa, 1.0)
    with pytest.raises(ValueError, match="xa"):
        lora_forward_4bit(x, weight, None, lora_B, xa.double(), 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_forward_4bit(x, weight, torch.randn(34), lora_B, xa, 1.0)
    with pytest.raises(ValueError, match="weight.blocksize"):
        lora_forward_4bit(x, weight._replace(blocksize=48), None, lora_B, xa, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_the_dequantized_formula_cuda():
    """Decode-sized inputs on a Llama-sized weight, every dtype (bf16 included); W from bitsandbytes' CUDA kernel."""
    import copy

    rank = 16
    for quant_type, nested in (("nf4", True), ("nf4", False), ("fp4", True)):
        param = quantized((1024, 4096), 64, quant_type, nested, seed=1)
        state = copy.deepcopy(param.quant_state)
        state.to("cuda")
        packed = param.data.cuda()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            W = bitsandbytes_dequantized(packed, state, dtype)
            for T in (1, 16, 32):
                gen = torch.Generator().manual_seed(T)
                x = torch.randn(T, 4096, generator=gen).to(dtype).cuda()
                bias = torch.randn(1024, generator=gen).to(dtype).cuda()
                lora_B = (torch.randn(1024, rank, generator=gen) / rank ** 0.5).cuda()
                xa = torch.randn(T, rank, generator=gen).cuda()
                y = lora_forward_4bit(x, weight_of(packed, state), bias, lora_B, xa, 2.0)
                expected = reference(x, W, bias, lora_B, xa, 2.0)
                assert_close_scaled(f"y {quant_type} nested={nested} {dtype} T={T}", y, expected.to(dtype),
                                    lora_reductions(T, 4096, 1024, rank)["y"], dtype=dtype)
