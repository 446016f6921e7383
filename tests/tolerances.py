"""Magnitude-scaled tolerances: the one rule for comparing floating-point results in this suite.

Two correct implementations of a sum of n products differ by rounding, and by how
much depends on the order of the additions, which the GEMM library picks per CPU
(MKL's AVX2 and AVX-512 kernels, the thread count, block sizes). Per element the
difference is not bounded by a multiple of that element: in a near-cancellation (an
element much smaller than its terms) the absolute error of the terms stays. So the
bound is absolute and scaled to the whole tensor:

    |actual - expected| <= atol = C * eps(dtype) * max|expected| * sqrt(n) + n * subnormal(dtype)

* eps(dtype): ``torch.finfo(dtype).eps`` of the less precise of the two tensors (or
  of the dtype a comparison names, when the inputs were rounded to a lower precision
  than the outputs, e.g. a bf16 x with fp32 adapters);
* max|expected|: stands for the size of the terms of the sums;
* n: the length of the reductions that made the tensor, added up along the chain,
  plus the elementwise roundings on the way (``lora_reductions``: xa K, y K + r,
  dx N + r, dA T + N, dB T + K, each + 4 for the mask's 1/(1-p) (an fp32 hi + lo pair
  in the Triton kernels), scaling, and the casts); at least 1;
* subnormal(dtype): the smallest subnormal (``tiny * eps``), the absolute precision of
  results that underflow (a scaling of 1e-313 on fp64, say): each of n additions of
  underflowed terms may round by up to half of it. Negligible otherwise.

max|expected| stands for the size of the terms only when the tensor has enough
elements; a tensor of one or two elements can itself be a near-cancellation. Where
shapes can be that small (the property tests), the comparison also gets ``terms``:
the same computation on absolute values (|x|, |W|, |A|, |B|, |dy|, |scaling|), whose
elements are the sums of the terms' magnitudes; then max|expected| * sqrt(n) is
raised to at least max(terms), the classic eps * sum|terms| bound of a dot product.

C = 4, written down once, for this reason: the largest ratio |actual - expected| /
(the bound with C = 1), measured over the whole suite's comparisons (3134 of them;
test_ops / test_function / test_compile converted too) at MKL's AVX-512, capped to
AVX2, and capped to SSE4.2 with ATen's default kernels at 1 thread
(``MKL_ENABLE_INSTRUCTIONS``, ``ATEN_CPU_CAPABILITY``, ``OMP_NUM_THREADS``), was
2.1: the Triton kernels' fp64 xa of a single element (1/(1-p) applied as an fp32
hi + lo pair). Every other comparison stayed under 1.2, the cpu and torch backends
under 0.65. So C = 4 leaves a margin of 2 on the worst case, 3.5 elsewhere; the
ratios were the same on every setting (the worst cases do not go through MKL).
To measure it again: ``FUSED_LORA_TOLERANCE_LOG=/tmp/ratios.txt pytest tests`` appends
every comparison's ratio to that file.
A real bug in fp32 or fp64 is far above it: one element dropped or kept wrongly
moves an output by about max|expected| / sqrt(n), a ratio of 1 / (eps * n): over
8000 for fp32 at the n <= 1000 tested here. For fp16/bf16 (eps 1e-3 / 8e-3) that
ratio is small, so half-precision results are checked with flash-attention's rule
instead (error against an fp32 reference within a multiple of the eager same-dtype
error, as in test_cpu_backend.check_half_against_fp32), with this bound as a floor.
"""

from __future__ import annotations

import math
import os

import torch

C = 4.0
ELEMENTWISE_ROUNDINGS = 4


def lora_reductions(T: int, K: int, N: int, r: int) -> dict[str, int]:
    """n of each tensor of one LoRA linear call (see the module docstring)."""
    lengths = {"xa": K, "y": K + r, "dx": N + r, "dA": T + N, "dB": T + K}
    return {name: length + ELEMENTWISE_ROUNDINGS for name, length in lengths.items()}


def _max_finite(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)].detach().cpu()
    return finite.abs().max().item() if finite.numel() else 0.0


def scaled_atol(expected: torch.Tensor, n: int, dtype: torch.dtype | None = None, c: float = C,
                terms: torch.Tensor | None = None) -> float:
    """``c * eps * max(max|expected| * sqrt(n), max(terms)) + n * subnormal`` (finite elements only)."""
    info = torch.finfo(dtype or expected.dtype)
    n = max(int(n), 1)
    size = _max_finite(expected) * math.sqrt(n)
    if terms is not None:
        size = max(size, _max_finite(terms))
    return c * info.eps * size + n * info.tiny * info.eps


def assert_close_scaled(name: str, actual: torch.Tensor, expected: torch.Tensor, n: int,
                        dtype: torch.dtype | None = None, c: float = C, equal_nan: bool = False,
                        magnitude_of: torch.Tensor | None = None, terms: torch.Tensor | None = None) -> None:
    """Dtype, shape, and every element within ``scaled_atol``; NaN and Inf where expected has them.

    ``magnitude_of``: the tensor whose size the rounded terms had, when it is not
    ``expected`` (a weight merged and unmerged again was rounded at the merged size).
    ``terms``: the computation on absolute values (see the module docstring).
    The message names the tensor, the worst element, both values and the bound.
    """
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    dtype = dtype or _lower_precision(actual.dtype, expected.dtype)
    magnitude_of = expected if magnitude_of is None else magnitude_of
    atol = scaled_atol(magnitude_of, n, dtype, c, terms)

    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if equal_nan:
        bad = (nan_a != nan_e).nonzero()
        assert bad.numel() == 0, (f"{name}: NaN pattern differs at {bad.shape[0]} elements, first at "
                                  f"{tuple(bad[0].tolist())}: got {actual[tuple(bad[0])].item()}, "
                                  f"expected {expected[tuple(bad[0])].item()}")
    else:
        assert not nan_e.any(), f"{name}: the expected tensor has NaN (pass equal_nan=True if that is meant)"
    inf_e = torch.isinf(expected)
    bad = ((actual != expected) & (inf_e | torch.isinf(actual)) & ~(nan_a & nan_e)).nonzero()
    assert bad.numel() == 0, (f"{name}: Inf pattern differs at {bad.shape[0]} elements, first at "
                              f"{tuple(bad[0].tolist())}: got {actual[tuple(bad[0])].item()}, "
                              f"expected {expected[tuple(bad[0])].item()}")

    finite = torch.isfinite(expected) & torch.isfinite(actual)
    err = torch.where(finite, (actual.double() - expected.double()).abs(), torch.zeros((), dtype=torch.float64))
    _log_ratio(name, err, scaled_atol(magnitude_of, n, dtype, 1.0, terms))
    if err.numel() and err.max().item() > atol:
        index = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3g} > atol {atol:.3g} "
            f"(= {c} * eps * max(max|expected| * sqrt({n}), max(terms)) + {n} * subnormal); worst at {index}: got {actual[index].item():.8g}, "
            f"expected {expected[index].item():.8g}; {int((err > atol).sum())} of {err.numel()} elements over")


def _lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _log_ratio(name: str, err: torch.Tensor, unit: float) -> None:
    path = os.environ.get("FUSED_LORA_TOLERANCE_LOG")
    if path and err.numel():
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{err.max().item() / unit:.4g} {test} {name}\n")
