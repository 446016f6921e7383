"""The eager reference itself: the formula of DESIGN.md, written out by hand."""

import torch

from fused_lora import dropout_mask, lora_linear_reference

from tolerances import assert_close_scaled


def test_reference_is_the_lora_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, generator=gen, dtype=torch.float64)
    W, b = torch.randn(7, 10, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    A, B = torch.randn(4, 10, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen, dtype=torch.float64)
    mask = dropout_mask(3, 6, 10, 0.25)
    x2 = x.reshape(6, 10)
    expected = x2 @ W.T + b + 1.5 * ((x2 * mask / 0.75) @ A.T) @ B.T
    y = lora_linear_reference(x, W, b, A, B, 1.5, keep_mask=mask, dropout_p=0.25)
    assert y.shape == (2, 3, 7)
    assert_close_scaled("y", y.reshape(6, 7), expected, 10 + 4)
    # Without a mask no dropout is applied, whatever p.
    no_dropout = x2 @ W.T + b + 1.5 * (x2 @ A.T) @ B.T
    assert_close_scaled("y without mask", lora_linear_reference(x, W, b, A, B, 1.5, dropout_p=0.25).reshape(6, 7),
                        no_dropout, 10 + 4)


def test_reference_output_dtype_follows_x_with_fp32_adapters():
    x = torch.randn(4, 8, dtype=torch.float16)
    W = torch.randn(5, 8, dtype=torch.float16)
    A, B = torch.randn(2, 8), torch.randn(5, 2)
    assert lora_linear_reference(x, W, None, A, B, 1.0).dtype == torch.float16
