"""The cpu backend's speed paths: every ISA build of the C++ loops, the ATen path, the tiny-size
fast paths, the torch backend's faster mask, and what the benchmarks record about the machine.

Each ISA level (FUSED_LORA_ISA caps it, read when the extension loads) runs in a fresh
process; on a CPU without AVX-512 (or AVX2) the cap leaves the best level it has, so these
tests pass on any x86-64 CPU (and elsewhere, where every level is the baseline build).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_lora
from fused_lora import philox
from fused_lora.env import env_flag
from fused_lora.reference import lora_linear_reference

try:
    from fused_lora import _C
    from fused_lora.ops import cpu_ops
except ImportError:  # pragma: no cover - depends on the build
    if env_flag("FUSED_LORA_SKIP_EXT"):
        pytest.skip("fused_lora._C not built (FUSED_LORA_SKIP_EXT=1)", allow_module_level=True)
    raise

ISA_LEVELS = ("avx512", "avx2", "baseline")

# (T, K, N, r): awkward sizes; r = 3 and 40 exercise the partial vectors and register
# blocks of every level (16 fp32 lanes on avx512, 8 on avx2, 4 on baseline).
CASES = [(1, 64, 64, 4), (5, 33, 130, 3), (70, 300, 100, 16), (33, 129, 257, 40)]


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **env)
    environment.pop("FUSED_LORA_CPU_PATH", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                          text=True)


def _inputs(T, K, N, r, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x = torch.randn(T, K, generator=gen).to(dtype)
    weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    lora_A = (torch.randn(r, K, generator=gen) / K ** 0.5).to(adapter_dtype)
    lora_B = (torch.randn(N, r, generator=gen) / r ** 0.5).to(adapter_dtype)
    dy = torch.randn(T, N, generator=gen).to(dtype)
    return x, weight, bias, lora_A, lora_B, dy


def _fused_run(x, weight, bias, lora_A, lora_B, dy, p, seed=77, scaling=0.7):
    x = x.clone().requires_grad_()
    lora_A = lora_A.clone().requires_grad_()
    lora_B = lora_B.clone().requires_grad_()
    y = fused_lora.fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed=seed, backend="cpu")
    y.backward(dy)
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def _reference_run(x, weight, bias, lora_A, lora_B, dy, p, seed=77, scaling=0.7):
    x = x.clone().double().requires_grad_()
    lora_A = lora_A.clone().double().requires_grad_()
    lora_B = lora_B.clone().double().requires_grad_()
    mask = fused_lora.dropout_mask(seed, x.shape[0], x.shape[1], p) if p > 0 else None
    y = lora_linear_reference(x, weight.double(), bias.double(), lora_A, lora_B, scaling, keep_mask=mask, dropout_p=p)
    y.backward(dy.double())
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def _assert_matches(name, got, expected, rtol):
    """|got - expected| within rtol of the reference tensor's magnitude (any summation order passes)."""
    scale = max(expected.abs().max().item(), 1e-30)
    err = (got.double() - expected).abs()
    assert err.max().item() <= rtol * scale, (
        f"{name}: max error {err.max().item():.3g} at {tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))}"
        f" against a reference of magnitude {scale:.3g}")


# --------------------------------------------------------------------------- ISA levels

_ISA_SCRIPT = """
    import sys, torch, fused_lora
    from fused_lora import _C
    from fused_lora.ops import cpu_ops
    results = {}
    for T, K, N, r in %r:
        gen = torch.Generator().manual_seed(T + K)
        x = torch.randn(T, K, generator=gen); w = torch.randn(N, K, generator=gen) / K ** 0.5
        b = torch.randn(N, generator=gen); dy = torch.randn(T, N, generator=gen)
        A = (torch.randn(r, K, generator=gen) / K ** 0.5); B = torch.randn(N, r, generator=gen) / r ** 0.5
        for p in (0.0, 0.3):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                xs, As, Bs = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
                y = fused_lora.fused_lora_linear(xs, w, b, As, Bs, 0.7, p, seed=2**40 + 3, backend="cpu")
                y.backward(dy)
                xa = cpu_ops.lora_shrink(x, A, 2**40 + 3, p)[0]
                results[(T, K, N, r, p, threads)] = (xa, y.detach(), xs.grad, As.grad, Bs.grad)
    torch.save(results, sys.argv[1] if len(sys.argv) > 1 else %r)
    print(_C.isa(), _C.philox_isa(), _C.cpu_isa())
"""


@pytest.fixture(scope="module")
def isa_results(tmp_path_factory):
    """{level: (isa, philox_isa, cpu_isa, results)} from one fresh process per FUSED_LORA_ISA level."""
    out = {}
    for level in ISA_LEVELS:
        path = tmp_path_factory.mktemp(level) / "results.pt"
        done = _run_python(_ISA_SCRIPT % (CASES, str(path)), FUSED_LORA_ISA=level)
        assert done.returncode == 0, done.stderr
        isa, philox_isa, cpu_isa = done.stdout.split()
        out[level] = (isa, philox_isa, cpu_isa, torch.load(path))
    return out


def test_isa_cap_picks_the_level(isa_results):
    order = {name: i for i, name in enumerate(reversed(ISA_LEVELS))}  # baseline 0, avx2 1, avx512 2
    for level, (isa, philox_isa, cpu_isa, _) in isa_results.items():
        assert isa == min(level, cpu_isa, key=order.__getitem__), (level, isa, cpu_isa)
        assert philox_isa == {"baseline": "scalar"}.get(isa, isa)


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_every_isa_level_matches_the_reference(isa_results, level):
    results = isa_results[level][3]
    for T, K, N, r in CASES:
        gen = torch.Generator().manual_seed(T + K)  # the inputs _ISA_SCRIPT drew
        x = torch.randn(T, K, generator=gen)
        weight = torch.randn(N, K, generator=gen) / K ** 0.5
        bias = torch.randn(N, generator=gen)
        dy = torch.randn(T, N, generator=gen)
        lora_A = torch.randn(r, K, generator=gen) / K ** 0.5
        lora_B = torch.randn(N, r, generator=gen) / r ** 0.5
        for p in (0.0, 0.3):
            expected = _reference_run(x, weight, bias, lora_A, lora_B, dy, p, seed=2**40 + 3)
            for threads in (1, 2):
                xa, *got = results[(T, K, N, r, p, threads)]
                for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
                    _assert_matches(f"{level} T={T} K={K} N={N} r={r} p={p} threads={threads} {name}", g, e, 1e-5)


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_every_isa_level_is_bit_identical_across_thread_counts(isa_results, level):
    """xa, dA and dB come from the C++ loops alone: the same bits for 1 and 2 threads."""
    results = isa_results[level][3]
    for T, K, N, r in CASES:
        for p in (0.0, 0.3):
            one, two = results[(T, K, N, r, p, 1)], results[(T, K, N, r, p, 2)]
            for name, a, b in zip(("xa", "dA", "dB"), (one[0], one[3], one[4]), (two[0], two[3], two[4])):
                assert torch.equal(a, b), f"{level} T={T} K={K} r={r} p={p} {name}: 1 and 2 threads differ"


def test_avx2_and_avx512_builds_give_the_same_bits(isa_results):
    """Both sum every element in the same order with FMA: a forced AVX2 run reproduces AVX-512's xa, dA, dB."""
    wide, narrow = isa_results["avx512"][3], isa_results["avx2"][3]
    for key in wide:
        for name, a, b in zip(("xa", "dA", "dB"), (wide[key][0], wide[key][3], wide[key][4]),
                              (narrow[key][0], narrow[key][3], narrow[key][4])):
            assert torch.equal(a, b), f"{key} {name}: the avx2 and avx512 builds differ"


@pytest.mark.parametrize("variable,value", [("FUSED_LORA_ISA", "sse9"), ("FUSED_LORA_PHILOX_ISA", "avx3")])
def test_invalid_isa_variable_is_a_clear_error(variable, value):
    done = _run_python("from fused_lora.ops import cpu_ops", **{variable: value})
    assert done.returncode != 0
    assert "ValueError" in done.stderr and variable in done.stderr and value in done.stderr, done.stderr


def test_invalid_cpu_path_variable_is_a_clear_error():
    done = _run_python("import os; os.environ['FUSED_LORA_CPU_PATH'] = 'gpu'; from fused_lora.ops import cpu_ops")
    assert done.returncode != 0 and "FUSED_LORA_CPU_PATH" in done.stderr and "'gpu'" in done.stderr, done.stderr


# --------------------------------------------------------------------------- fused and ATen paths

@pytest.fixture
def cpu_path(monkeypatch):
    def use(path):
        monkeypatch.setattr(cpu_ops, "PATH", path)
    return use


@pytest.mark.parametrize("path", ["fused", "aten"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", [(1, 64, 64, 4), (3, 200, 120, 130), (70, 300, 100, 16), (5, 33, 17, 1)],
                         ids=lambda c: "T{}_K{}_N{}_r{}".format(*c))
def test_both_paths_match_the_reference(cpu_path, path, p, case):
    cpu_path(path)
    inputs = _inputs(*case)
    got = _fused_run(*inputs, p)
    expected = _reference_run(*inputs, p)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        _assert_matches(f"{path} {case} p={p} {name}", g, e, 1e-5)


@pytest.mark.parametrize("path", ["fused", "aten"])
def test_both_paths_in_bfloat16(cpu_path, path):
    """bf16 x and weight, fp32 adapters: within a few bf16 roundings of the fp64 reference."""
    cpu_path(path)
    inputs = _inputs(40, 96, 72, 8, dtype=torch.bfloat16)
    got = _fused_run(*inputs, 0.2)
    expected = _reference_run(*inputs, 0.2)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert g.dtype == (torch.bfloat16 if name in ("y", "dx") else torch.float32), name
        _assert_matches(f"{path} bf16 {name}", g, e, 3e-2)


@pytest.mark.parametrize("path", ["fused", "aten"])
def test_dropped_nan_reaches_dA_as_in_the_reference(cpu_path, path):
    """D(x) multiplies dropped elements by 0, so a NaN there still makes dA NaN (x * mask / (1 - p))."""
    cpu_path(path)
    x, weight, bias, lora_A, lora_B, dy = _inputs(8, 40, 24, 4)
    mask = fused_lora.dropout_mask(77, 8, 40, 0.5)
    row, col = (~mask).nonzero()[0].tolist()
    x[row, col] = float("nan")
    _, _, dA, dB = _fused_run(x, weight, bias, lora_A, lora_B, dy, 0.5)
    _, _, dA_ref, dB_ref = _reference_run(x, weight, bias, lora_A, lora_B, dy, 0.5)
    assert torch.equal(dA.isnan(), dA_ref.isnan()) and dA[:, col].isnan().all()
    assert torch.equal(dB.isnan(), dB_ref.isnan())


def test_fused_path_rule():
    """The measured rule (cpu_ops.fused_path): fused loops for the goal shape and tiny jobs, ATen GEMMs
    above the ISA level's rank limit and for fewer rows than the rank on large adapters."""
    assert cpu_ops.PATH == "auto"
    for p in (0.0, 0.1):
        assert cpu_ops.fused_path(4096, 2048, 2048, 16, p)  # the goal shape
        assert cpu_ops.fused_path(1, 64, 64, 4, p)  # the latency shape
        assert cpu_ops.fused_path(16, 64, 64, 128, p)  # r (K + N) and T r (K + N) small
        assert not cpu_ops.fused_path(4096, 2048, 2048, 256, p)
        assert not cpu_ops.fused_path(1, 2048, 2048, 16, p)
        limit = cpu_ops.MAX_FUSED_RANK[(cpu_ops.ISA, p > 0.0)]
        assert cpu_ops.fused_path(4096, 2048, 2048, limit, p)
        assert not cpu_ops.fused_path(4096, 2048, 2048, limit + 1, p)
    assert cpu_ops.fused_path(4096, 2048, 2048, 16) == cpu_ops.fused_path(4096, 2048, 2048, 16, 0.0)


def test_seed_may_be_a_tensor():
    x, _, _, lora_A, _, _ = _inputs(9, 40, 8, 4)
    from_int = _C.lora_shrink(x, lora_A, 2**40 + 9, philox.dropout_threshold(0.3), 0.3)
    from_tensor = _C.lora_shrink(x, lora_A, torch.tensor(2**40 + 9), philox.dropout_threshold(0.3), 0.3)
    assert torch.equal(from_int, from_tensor)
    with pytest.raises(RuntimeError, match="seed"):
        _C.lora_shrink(x, lora_A, torch.tensor(-5), 100, 0.3)
    with pytest.raises(RuntimeError, match="seed"):
        _C.lora_shrink(x, lora_A, torch.tensor([1, 2]), 100, 0.3)


def test_dropout_op_is_the_mask_times_the_scale():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(37, 53).to(dtype)[:, 1:]  # a row stride that is not the width
        got = _C.dropout(x, 99, philox.dropout_threshold(0.3), 0.3, 2.5)
        expected = x.to(got.dtype) * philox.keep_mask_torch(99, 37, 52, 0.3) * 2.5
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(got, expected), dtype


# --------------------------------------------------------------------------- threads

def test_one_openmp_runtime_in_the_process():
    """The extension's libgomp resolves to the copy torch loaded: one OpenMP runtime, one thread pool."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux)")
    done = _run_python("""
        import torch
        from fused_lora import _C
        torch.ones(1 << 16).add_(1)
        names = {line.split()[-1] for line in open('/proc/self/maps')
                 if any(lib in line for lib in ('libgomp', 'libiomp', 'libomp.'))}
        print(len(names))
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) <= 1, done.stdout


# --------------------------------------------------------------------------- the torch backend's mask

@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_fast_torch_mask_equals_the_reference_stream(seed):
    for rows, cols, p in [(1, 1, 0.1), (3, 5, 0.5), (17, 33, 0.9), (9, 1000, 0.1), (1, 8, 1e-6), (4, 4, 0.999999)]:
        threshold = philox.dropout_threshold(p)
        expected = (philox.random_uint16(seed, 0, rows * cols) >= threshold).view(rows, cols)
        for chunk_groups in (1, 3, 1 << 16):
            got = philox.keep_mask_torch(seed, rows, cols, p, chunk_groups=chunk_groups)
            assert torch.equal(got, expected), (seed, rows, cols, p, chunk_groups)


def test_fast_torch_words_past_the_32_bit_group_counter():
    words = philox._philox_words(77, 2**32 - 5, 10, "cpu")
    lanes = torch.stack([w.to(torch.int32) for w in words], 1).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(lanes.view(-1), philox.random_uint16(77, (2**32 - 5) * 8, 80))


# --------------------------------------------------------------------------- what the benchmarks record

def test_benchmark_rows_name_the_machine():
    from bench import report

    meta = report.metadata(torch.device("cpu"))
    assert meta["isa"] == cpu_ops.ISA and meta["isa"] in ISA_LEVELS
    assert meta["cpu_model"] and meta["threads"] == torch.get_num_threads()
    assert meta["aten_cpu_capability"] not in ("", None)
    assert {"cpu_model", "isa", "threads", "aten_cpu_capability", "mkl_instructions"} <= set(report.META_COLUMNS)
    assert report.backend_used("cpu", 2048, 2048, 4096, 16, 0.1) == "cpu:fused"
    assert report.backend_used("cpu", 2048, 2048, 4096, 256, 0.1) == "cpu:aten"
    assert report.backend_used("torch", 2048, 2048, 4096, 16, 0.1) == "torch"
