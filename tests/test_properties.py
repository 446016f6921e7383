"""Property-based tests (hypothesis): random shapes, layouts, seeds and scalings against the reference.

For every drawn case, y, dx, dA and dB of ``fused_lora_linear`` equal those of the
eager reference fed with ``fused_lora.dropout_mask`` for the same seed, within the
suite's magnitude-scaled tolerance (tests/tolerances.py). x comes contiguous,
transposed, sliced, expanded (stride 0), or as a 3-D / 4-D (permuted) tensor.

Examples are derandomized (the same cases on every machine, so CI is repeatable);
``HYPOTHESIS_PROFILE=explore`` draws new random cases, more of them.

Also: 4 Python threads calling one layer at once give what serial calls give.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_lora import FusedLoRALinear, dropout_mask, fused_lora_linear, lora_linear_reference
from fused_lora.ops.backends import _runs_on

from conftest import run_forward_backward
from tolerances import assert_close_scaled, lora_reductions

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, database=None, deadline=None, print_blob=True,
                          max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXPLORING = os.environ.get("HYPOTHESIS_PROFILE") == "explore"

CPU = torch.device("cpu")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "3d", "4d")


def _make_x(layout: str, T: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """An x with T rows of K features (flattened) in the given memory layout."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "contiguous":
        return randn(T, K)
    if layout == "transposed":
        return randn(K, T).t()
    if layout == "sliced":
        return randn(2 * T + 1, 2 * K + 3)[1::2, 2::2][:T, :K]
    if layout == "expanded":  # stride 0: every row is the same memory
        return randn(K).expand(T, K)
    if layout == "3d":  # (a, b, K) with a * b = T, permuted from (b, a, K)
        a = next(d for d in (3, 2, 1) if T % d == 0)
        return randn(T // a, a, K).transpose(0, 1)
    # 4d: (a, b, c, K) with a * b * c = T, K not the innermost stride
    a = next(d for d in (2, 1) if T % d == 0)
    return randn(a, K, 1, T // a).permute(0, 2, 3, 1)


@st.composite
def cases(draw, max_rows: int, max_features: int, max_rank: int):
    layout = draw(st.sampled_from(LAYOUTS))
    rows = draw(st.integers(1, max_rows))
    return dict(
        layout=layout, T=rows, K=draw(st.integers(1, max_features)), N=draw(st.integers(1, max_features)),
        r=draw(st.integers(1, max_rank)), bias=draw(st.booleans()), p=draw(st.sampled_from([0.0, 0.1, 0.5])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2 ** 63 - 1)),
        scaling=draw(st.one_of(st.just(0.0), st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False))),
        data_seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def check_case(backend: str, case: dict) -> None:
    T, K, N, r, dtype, p, seed = case["T"], case["K"], case["N"], case["r"], case["dtype"], case["p"], case["seed"]
    gen = torch.Generator().manual_seed(case["data_seed"])
    x = _make_x(case["layout"], T, K, dtype, gen)
    assert x.numel() // K == T and x.shape[-1] == K

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    weight = randn(N, K, scale=K ** -0.5)
    bias = randn(N) if case["bias"] else None
    lora_A = randn(r, K, scale=K ** -0.5)
    lora_B = randn(N, r, scale=r ** -0.5)
    dy = randn(*x.shape[:-1], N)
    mask = dropout_mask(seed, T, K, p) if p > 0 else None

    def fused(x_, a, b):
        return fused_lora_linear(x_, weight, bias, a, b, case["scaling"], p, seed=seed, backend=backend)

    def reference(x_, a, b, absolute=False):
        w, b0, s = weight, bias, case["scaling"]
        if absolute:  # the sums of the terms' magnitudes: the tolerance's floor for tiny tensors
            w, b0, s = w.abs(), None if b0 is None else b0.abs(), abs(s)
        return lora_linear_reference(x_, w, b0, a, b, s, keep_mask=mask, dropout_p=p)

    got = run_forward_backward(fused, x, lora_A, lora_B, dy)
    expected = run_forward_backward(reference, x, lora_A, lora_B, dy)
    terms = run_forward_backward(lambda x_, a, b: reference(x_, a, b, absolute=True),
                                 x.abs(), lora_A.abs(), lora_B.abs(), dy.abs())
    reductions = lora_reductions(T, K, N, r)
    for name, g, e, t in zip(("y", "dx", "dA", "dB"), got, expected, terms):
        assert_close_scaled(f"{name} ({case})", g, e, reductions[name], terms=t)


def _requires(backend):
    return pytest.mark.skipif(not _runs_on(backend, CPU), reason=f"backend {backend} cannot run CPU tensors here")


# NOTE: suite time on 2 cores: torch and cpu about 3 s each at 200 examples; the
# Triton interpreter runs one program at a time, so it gets small shapes and 40 examples (~12 s).
@_requires("torch")
@settings(max_examples=1000 if EXPLORING else 200)
@given(case=cases(max_rows=48, max_features=40, max_rank=12))
def test_torch_backend_matches_reference(case):
    check_case("torch", case)


@_requires("cpu")
@settings(max_examples=1000 if EXPLORING else 200)
@given(case=cases(max_rows=48, max_features=40, max_rank=12))
def test_cpu_backend_matches_reference(case):
    check_case("cpu", case)


@_requires("triton")
@settings(max_examples=200 if EXPLORING else 40)
@given(case=cases(max_rows=12, max_features=20, max_rank=5))
def test_triton_backend_matches_reference(case):
    check_case("triton", case)


# --------------------------------------------------------------------------- thread safety

THREADS = 4
CALLS_PER_THREAD = 3


def test_threads_calling_one_layer_get_what_serial_calls_get(device_backend, request):
    device, backend = device_backend
    if backend == "triton" and device.type == "cpu":
        # NOTE: Triton's interpreter keeps the program's grid and language state in
        # module globals, so concurrent interpreted launches trip over each other; real
        # (CUDA) launches do not share that state, and this test runs them on a GPU.
        request.applymarker(pytest.mark.xfail(
            strict=False, reason="Triton's interpreter is not thread-safe (global grid state); checked on CUDA"))
    torch.manual_seed(0)
    layer = FusedLoRALinear(40, 24, r=6, lora_alpha=12, lora_dropout=0.2, device=device)
    layer.backend = backend
    torch.nn.init.normal_(layer.lora_B)
    gen = torch.Generator().manual_seed(1)
    # Per call: its own x (of its own shape) and seed, so a mix-up between threads shows.
    work = [(torch.randn(3 + i % 5, 40, generator=gen).to(device), 1000 + i)
            for i in range(THREADS * CALLS_PER_THREAD)]

    def call(x, seed):
        x = x.clone().requires_grad_(True)
        y_eval = layer(x)  # the module's own path (eval: no dropout)
        y = fused_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                              layer.lora_dropout, seed=seed, backend=backend)
        grads = torch.autograd.grad(y + y_eval, (x, layer.lora_A, layer.lora_B), torch.ones_like(y))
        return (y_eval.detach(), y.detach()) + grads

    layer.eval()
    serial = [call(x, seed) for x, seed in work]
    concurrent = [None] * len(work)
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(thread):
        try:
            barrier.wait()
            for i in range(thread, len(work), THREADS):
                concurrent[i] = call(*work[i])
        except BaseException as error:  # reported below, with the thread
            errors.append((thread, error))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (one, other) in enumerate(zip(serial, concurrent)):
        T = work[i][0].shape[0]
        reductions = lora_reductions(T, 40, 24, 6)
        for name, a, b in zip(("y (eval)", "y", "dx", "dA", "dB"), other, one):
            assert_close_scaled(f"call {i}: {name}", a, b, reductions[name.split(" ")[0]])
