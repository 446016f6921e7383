"""NaN and Inf: every backend propagates them as the reference (and PEFT, F.dropout) does.

A dropped element is multiplied by 0, never selected away, so a NaN or Inf that falls
on it still spreads (0 * Inf = NaN); and scaling = 0 multiplies too (0 * Inf in B is NaN).
Each case puts one non-finite value on a kept or a dropped element of x, or in
lora_A / lora_B (which reach dropped elements of dx), and compares y, dx, dA and dB with
the reference fed the same mask: same NaN and Inf positions, finite values close.
"""

import math

import pytest
import torch

from fused_lora import dropout_mask, fused_lora_linear, lora_linear_reference

from conftest import run_forward_backward
from tolerances import assert_close_scaled, lora_reductions

T, K, N, R = 6, 16, 8, 4
P = 0.5
SEED = 2024


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, K, generator=gen, dtype=dtype)
    weight = torch.randn(N, K, generator=gen, dtype=dtype) / K ** 0.5
    bias = torch.randn(N, generator=gen, dtype=dtype)
    lora_A = torch.randn(R, K, generator=gen, dtype=dtype) / K ** 0.5
    lora_B = torch.randn(N, R, generator=gen, dtype=dtype) / R ** 0.5
    dy = torch.randn(T, N, generator=gen, dtype=dtype)
    return x, weight, bias, lora_A, lora_B, dy


def _element(mask: torch.Tensor, kept: bool) -> tuple[int, int]:
    """The first (row, column) that the mask keeps (or drops)."""
    where = (mask == kept).nonzero()
    assert where.numel(), "the mask has no such element"
    return tuple(int(i) for i in where[0])


def _compare(device, backend, x, weight, bias, lora_A, lora_B, dy, scaling, p):
    mask = dropout_mask(SEED, T, K, p) if p > 0 else None

    def fused(x_, a, b):
        return fused_lora_linear(x_, weight.to(device), bias.to(device), a, b, scaling, p, seed=SEED,
                                 training=True, backend=backend)

    def reference(x_, a, b):
        return lora_linear_reference(x_, weight, bias, a, b, scaling, keep_mask=mask, dropout_p=p)

    got = run_forward_backward(fused, x.to(device), lora_A.to(device), lora_B.to(device), dy.to(device))
    expected = run_forward_backward(reference, x, lora_A, lora_B, dy)
    assert any(not torch.isfinite(e).all() for e in expected), "the case has no non-finite value to check"
    reductions = lora_reductions(T, K, N, R)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close_scaled(name, g.cpu(), e, reductions[name], equal_nan=True)
    return expected


# Where the value goes: x on a kept / a dropped element; a column of lora_A or a row of
# lora_B, which reach dx's dropped elements through dxa A.
PLACES = ("x-kept", "x-dropped", "lora_A", "lora_B")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("place", PLACES)
def test_non_finite_on_kept_and_dropped_elements(device_backend, place, value):
    device, backend = device_backend
    x, weight, bias, lora_A, lora_B, dy = _inputs()
    mask = dropout_mask(SEED, T, K, P)
    kept_i, kept_k = _element(mask, True)
    dropped_i, dropped_k = _element(mask, False)
    if place == "x-kept":
        x[kept_i, kept_k] = value
    elif place == "x-dropped":
        x[dropped_i, dropped_k] = value
    elif place == "lora_A":
        lora_A[1, dropped_k] = value  # dx[:, k] = s D(dxa A[:, k]): NaN on dropped rows too
    else:
        lora_B[2, 1] = value  # every row of dxa, so every element of dx, dropped ones too
    expected = _compare(device, backend, x, weight, bias, lora_A, lora_B, dy, 0.75, P)
    # The reference's semantics, spelt out: a dropped NaN/Inf still reaches y (as NaN) and dA.
    if place == "x-dropped":
        assert torch.isnan(expected[0][dropped_i]).all() and torch.isnan(expected[2][:, dropped_k]).all()
    if place in ("lora_A", "lora_B"):
        assert torch.isnan(expected[1][dropped_i, dropped_k])


@pytest.mark.parametrize("p", [0.0, P])
def test_zero_scaling_with_inf_in_lora_B(device_backend, p):
    """scaling = 0 multiplies: 0 * Inf = NaN in y and the gradients, as in the reference."""
    device, backend = device_backend
    x, weight, bias, lora_A, lora_B, dy = _inputs()
    lora_B[3, 2] = math.inf
    expected = _compare(device, backend, x, weight, bias, lora_A, lora_B, dy, 0.0, p)
    assert torch.isnan(expected[0][:, 3]).all()


def test_nan_in_x_without_dropout_stays_in_its_row(device_backend):
    device, backend = device_backend
    x, weight, bias, lora_A, lora_B, dy = _inputs()
    x[4, 7] = math.nan
    expected = _compare(device, backend, x, weight, bias, lora_A, lora_B, dy, 1.5, 0.0)
    assert torch.isnan(expected[0][4]).all() and torch.isfinite(expected[0][:4]).all()
