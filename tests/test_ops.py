"""The backend operations (launchers) one by one, against eager PyTorch on the same inputs;
the triton launchers' strategies (pointer, TMA, cuBLAS hybrid), mask modes and plan cache."""

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fused_lora
from fused_lora.ops import backends
from fused_lora.ops.backends import backend_ops
from fused_lora.philox import keep_mask_torch

from conftest import DEVICE_BACKENDS, make_inputs
from tolerances import assert_close_scaled, lora_reductions

SHAPES = [(1, 1, 1, 1), (70, 37, 45, 3), (150, 64, 20, 16), (129, 200, 70, 64)]
TRITON_DEVICES = [d for d, b in DEVICE_BACKENDS if b == "triton"]


def _dropped(x, seed, p):
    if p == 0.0:
        return x
    return x * keep_mask_torch(seed, *x.shape, p).to(x.device) / (1 - p)


def _expected(x, weight, bias, lora_A, lora_B, dy, seed, p, scaling):
    """Eager fp64 y, dx, dA, dB (xa from the same eager math)."""
    x, weight, lora_A, lora_B, dy = (t.double() for t in (x, weight, lora_A, lora_B, dy))
    xa = _dropped(x, seed, p) @ lora_A.T
    y = x @ weight.T + scaling * xa @ lora_B.T + (0 if bias is None else bias.double())
    dxa = dy @ lora_B
    return {"xa": xa, "y": y, "dx": dy @ weight + scaling * _dropped(dxa @ lora_A, seed, p),
            "dA": scaling * dxa.T @ _dropped(x, seed, p), "dB": scaling * dy.T @ xa}


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("T,K,N,r", SHAPES)
def test_operations_against_eager(device_backend, T, K, N, r, p):
    device, backend = device_backend
    ops = backend_ops(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, torch.float64, device)
    seed, scaling = 2 ** 40 + 17, 0.5
    dy = torch.randn(T, N, dtype=torch.float64, device=device)

    n = lora_reductions(T, K, N, r)
    xa, bits = ops.lora_shrink(x, lora_A, seed, p)
    assert xa.shape == (T, r) and xa.dtype == torch.float64
    assert bits is None or (backend == "triton" and p > 0)
    assert_close_scaled("xa", xa, _dropped(x, seed, p) @ lora_A.T, n["xa"])

    y = ops.lora_forward(x, weight, bias, lora_B, xa, scaling)
    assert_close_scaled("y", y, x @ weight.T + bias + scaling * xa @ lora_B.T, n["y"])

    dxa = dy @ lora_B
    expected = {
        "dx": dy @ weight + scaling * _dropped(dxa @ lora_A, seed, p),
        "dA": scaling * dxa.T @ _dropped(x, seed, p),
        "dB": scaling * dy.T @ xa,
    }
    for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        results = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, seed, p, bits, *needs)
        for name, wanted, got in zip(("dx", "dA", "dB"), needs, results):
            if wanted:
                assert_close_scaled(name, got, expected[name], n[name])
            else:
                assert got is None, f"{name} computed although not requested"


def test_reductions_are_deterministic(device_backend):
    device, backend = device_backend
    ops = backend_ops(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(300, 64, 40, 8, torch.float32, device)
    xa, bits = ops.lora_shrink(x, lora_A, 5, 0.1)
    dy = torch.randn(300, 40, device=device)
    first = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 1.0, 5, 0.1, bits, True, True, True)
    again = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 1.0, 5, 0.1, bits, True, True, True)
    for name, a, b in zip(("dx", "dA", "dB"), first, again):
        assert torch.equal(a, b), f"{name} is not bit-identical run to run"


def test_seed_tensor_and_int_seed_give_the_same_result(device_backend):
    device, backend = device_backend
    ops = backend_ops(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(40, 24, 16, 4, torch.float32, device)
    seed = 2 ** 35 + 3
    from_int, _ = ops.lora_shrink(x, lora_A, seed, 0.4)
    from_tensor, _ = ops.lora_shrink(x, lora_A, torch.tensor(seed, device=device), 0.4)
    assert torch.equal(from_int, from_tensor)


# ----------------------------------------------------------------------------- triton launchers

@pytest.fixture
def triton_ops():
    if not TRITON_DEVICES:
        pytest.skip("triton cannot run here")
    ops = backend_ops("triton")
    ops.clear_plans()
    yield ops
    ops.clear_plans()


def _triton_device():
    return TRITON_DEVICES[0]


def _run_all(ops, x, weight, bias, lora_A, lora_B, dy, seed, p, scaling):
    xa, bits = ops.lora_shrink(x, lora_A, seed, p)
    y = ops.lora_forward(x, weight, bias, lora_B, xa, scaling)
    dx, dA, dB = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, seed, p, bits, True, True, True)
    return {"xa": xa, "y": y, "dx": dx, "dA": dA, "dB": dB}, bits


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("T,K,N,r", [(70, 40, 48, 3), (33, 64, 96, 16), (40, 48, 56, 64)])
def test_triton_tma_kernels(triton_ops, monkeypatch, T, K, N, r, p):
    # On CPU the interpreter runs the persistent TMA kernels when asked to; on a GPU
    # with sm_90 they are the default for fp16/bf16, up to r = 64 (TMA_MAX_RANK_BLOCK).
    device = _triton_device()
    if device.type == "cpu":
        monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
    elif torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs sm_90")
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, torch.float16, device, adapter_dtype=torch.float32)
    dy = torch.randn(T, N, device=device).half()
    got, _ = _run_all(triton_ops, x, weight, bias, lora_A, lora_B, dy, 77, p, 0.75)
    plans = list(triton_ops._FORWARD_PLANS.plans.values()) + list(triton_ops._BACKWARD_PLANS.plans.values())
    labels = [getattr(plan, "label", None) or plan.dx_label for plan in plans]
    assert all(label.startswith("tma:") for label in labels), labels
    want = _expected(x, weight, bias, lora_A, lora_B, dy, 77, p, 0.75)
    n = lora_reductions(T, K, N, r)
    for name in got:  # fp16 operands and outputs (xa, dA, dB in the fp32 adapters' dtype)
        assert_close_scaled(name, got[name].double(), want[name], n[name], dtype=torch.float16)


def test_triton_hybrid_strategy(triton_ops, monkeypatch):
    # The cuBLAS hybrid (a Triton kernel writes the low-rank term, addmm_ adds the base GEMM).
    device = _triton_device()
    original = triton_ops.tuning._gemm_candidates

    def hybrid_only(*args, **kwargs):
        if device.type == "cpu":
            config = triton_ops.tuning.INTERPRETER_GEMM_CONFIG
            return [("hybrid", "hybrid", config)]
        return [c for c in original(*args, **kwargs) if c[1] == "hybrid"]

    monkeypatch.setattr(triton_ops.tuning, "_gemm_candidates", hybrid_only)
    x, weight, bias, lora_A, lora_B = make_inputs(50, 40, 36, 5, torch.float32, device)
    dy = torch.randn(50, 36, device=device)
    got, _ = _run_all(triton_ops, x, weight, bias, lora_A, lora_B, dy, 3, 0.2, 1.5)
    assert list(triton_ops._FORWARD_PLANS.plans.values())[0].label == "hybrid"
    assert list(triton_ops._BACKWARD_PLANS.plans.values())[0].dx_label == "hybrid"
    want = _expected(x, weight, bias, lora_A, lora_B, dy, 3, 0.2, 1.5)
    n = lora_reductions(50, 40, 36, 5)
    for name in got:
        assert_close_scaled(name, got[name].double(), want[name], n[name], dtype=torch.float32)


def test_triton_keep_bits_mode_and_seed_mode_agree(triton_ops, monkeypatch):
    device = _triton_device()
    x, weight, bias, lora_A, lora_B = make_inputs(45, 36, 20, 4, torch.float32, device)
    dy = torch.randn(45, 20, device=device)
    results = {}
    for mode in backends.TRITON_MASK_MODES:
        monkeypatch.setattr(backends, "TRITON_MASK_MODE", mode)
        triton_ops.clear_plans()
        results[mode], bits = _run_all(triton_ops, x, weight, bias, lora_A, lora_B, dy, 11, 0.35, 0.5)
        assert (bits is not None) == (mode == "bits")
    for name in results["bits"]:
        assert torch.equal(results["bits"][name], results["seed"][name]), name


@pytest.mark.parametrize("K", [24, 37])
def test_triton_keep_bits_hold_the_dropout_mask(triton_ops, K):
    device = _triton_device()
    x = torch.randn(19, K, device=device)
    lora_A = torch.randn(2, K, device=device)
    _, bits = triton_ops.lora_shrink(x, lora_A, 2 ** 33 + 1, 0.45)
    assert bits.dtype == torch.uint8 and bits.shape == (19, (K + 7) // 8)
    expected = fused_lora.dropout_mask(2 ** 33 + 1, 19, K, 0.45)
    assert torch.equal(triton_ops.unpack_keep_bits(bits, K).cpu(), expected)
    # The padding bits of each row's last byte are zero (dropped), so the bytes are deterministic.
    if K % 8:
        assert (bits[:, -1].cpu().int() >> (K % 8)).eq(0).all()


def test_triton_plans_are_reused_and_bounded(triton_ops, monkeypatch):
    device = _triton_device()
    x, weight, bias, lora_A, lora_B = make_inputs(20, 16, 12, 2, torch.float32, device)
    triton_ops.lora_forward(x, weight, bias, lora_B, triton_ops.lora_shrink(x, lora_A, 1, 0.1)[0], 1.0)
    count = triton_ops.plan_count()
    assert count == 2
    triton_ops.lora_forward(x, weight, bias, lora_B, triton_ops.lora_shrink(x, lora_A, 2, 0.1)[0], 1.0)
    assert triton_ops.plan_count() == count, "a second call with the same signature built a new plan"
    for cache in (triton_ops._SHRINK_PLANS, triton_ops._FORWARD_PLANS, triton_ops._BACKWARD_PLANS):
        monkeypatch.setattr(cache, "size", 3)
    for rows in range(21, 28):
        xs = torch.randn(rows, 16, device=device)
        triton_ops.lora_shrink(xs, lora_A, 1, 0.1)
    assert len(triton_ops._SHRINK_PLANS) <= 3


def test_triton_out_of_range_scaling_is_refused_not_garbled(triton_ops):
    device = _triton_device()
    x, weight, bias, lora_A, lora_B = make_inputs(4, 8, 6, 2, torch.float64, device)
    xa, _ = triton_ops.lora_shrink(x, lora_A, 1, 0.0)
    with pytest.raises(ValueError, match="scaling"):
        triton_ops.lora_forward(x, weight, bias, lora_B, xa, 1e39)


def _max_error(got, want):
    """max |got - want| relative to max |want| (want in fp64)."""
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("p,tma", [(0.0, False), (0.1, False), (0.1, True)])
def test_triton_fp32_adapters_on_fp16_input_keep_the_lora_branch_in_fp32(triton_ops, monkeypatch, p, tma):
    # PEFT's default: fp32 adapters on a 16-bit model, the LoRA branch computed in fp32.
    # Each result's error against fp64 must be within 2x the torch backend's (which
    # computes the branch in fp32): rounding A, B, xa or dxa to fp16 for a dot makes
    # dA and dB hundreds of times worse.
    device = _triton_device()
    if tma and device.type == "cpu":
        monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
    elif tma and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs sm_90")
    T, K, N, r = 256, 512, 384, 16
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, torch.float16, device, adapter_dtype=torch.float32)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(5)).half().to(device)
    want = _expected(x, weight, bias, lora_A, lora_B, dy, 91, p, 0.5)
    got, _ = _run_all(triton_ops, x, weight, bias, lora_A, lora_B, dy, 91, p, 0.5)
    if tma:
        plans = list(triton_ops._FORWARD_PLANS.plans.values()) + list(triton_ops._BACKWARD_PLANS.plans.values())
        assert all((getattr(plan, "label", None) or plan.dx_label).startswith("tma:") for plan in plans)
    torch_ops = backend_ops("torch")
    eager, _ = _run_all(torch_ops, x.cpu(), weight.cpu(), bias.cpu(), lora_A.cpu(), lora_B.cpu(), dy.cpu(), 91, p, 0.5)
    for name in ("xa", "y", "dx", "dA", "dB"):
        assert got[name].dtype == eager[name].dtype, name
        error, eager_error = _max_error(got[name].cpu(), want[name].cpu()), _max_error(eager[name], want[name].cpu())
        assert error <= 2 * eager_error, (f"{name}: error {error:.3g} against fp64, the torch backend's "
                                          f"{eager_error:.3g}")


def _jit_specialisation(fn, args, constexprs, options):
    """The specialisation Triton's JIT compiles ``fn`` for with these arguments (its own
    argument binder; under the interpreter, that of a JITFunction made from the same source)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn, **fn.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, specialisation, _ = binder(*args, **constexprs, **options)
    return str(specialisation)


def test_triton_persistent_kernels_compile_once_for_every_T(triton_ops, monkeypatch):
    # Each new T changes the tile count, so the number of persistent programs; it must not
    # change what Triton compiles (a constexpr program count recompiled each time, seconds on
    # a fresh GPU machine). T avoids 1 and multiples of 16, which Triton specialises on.
    from fused_lora.ops.triton_ops import plans

    device = _triton_device()
    if device.type == "cpu":
        monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
    elif torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs sm_90")
    launches = []
    original = plans._Launch.__call__

    def record(self, *args):
        launches.append((self.fn, args, self.constexprs, self.options, self.grid))
        return original(self, *args)

    monkeypatch.setattr(plans._Launch, "__call__", record)
    K, N, r = 48, 40, 4
    x, weight, bias, lora_A, lora_B = make_inputs(200, K, N, r, torch.float16, device, adapter_dtype=torch.float32)
    for T in (5, 40, 100, 200):
        dy = torch.randn(T, N, device=device).half()
        got, _ = _run_all(triton_ops, x[:T].contiguous(), weight, bias, lora_A, lora_B, dy, 7, 0.1, 0.5)
        want = _expected(x[:T], weight, bias, lora_A, lora_B, dy, 7, 0.1, 0.5)
        n = lora_reductions(T, K, N, r)
        for name in ("y", "dx"):
            assert_close_scaled(name, got[name].double(), want[name], n[name], dtype=torch.float16)
    persistent = {"_lora_fwd_tma_kernel", "_lora_bwd_dx_tma_kernel"}
    specialisations, grids = {}, {}
    for fn, args, constexprs, options, grid in launches:
        if fn.__name__ in persistent:
            specialisations.setdefault(fn.__name__, set()).add(_jit_specialisation(fn, args, constexprs, options))
            grids.setdefault(fn.__name__, set()).add(grid)
    assert set(specialisations) == persistent, "the TMA kernels did not run"
    for name in persistent:
        assert len(grids[name]) > 1, f"{name}: every T launched the same number of programs; the test shows nothing"
        assert len(specialisations[name]) == 1, f"{name}: compiled {len(specialisations[name])} times for 4 T"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_shrink_split_over_K_matches_one_pass(triton_ops, monkeypatch, p):
    # A large x splits K across programs (partial sums, added in order) instead of shrinking
    # the row blocks; every split writes its columns' keep bits.
    from fused_lora.ops import backends as backends_module

    device = _triton_device()
    T, K, r = 37, 200, 5
    x, _, _, lora_A, _ = make_inputs(T, K, 8, r, torch.float32, device)
    monkeypatch.setattr(backends_module, "TRITON_MASK_MODE", "bits")
    monkeypatch.setattr(triton_ops.tuning, "SHRINK_SPLIT_BYTES", 0)
    if device.type == "cuda":
        monkeypatch.setitem(triton_ops.CONFIG_OVERRIDES, "shrink", (16, 32, 4, 2))
    xa, bits = triton_ops.lora_shrink(x, lora_A, 9, p)
    plan = next(iter(triton_ops._SHRINK_PLANS.plans.values()))
    assert plan.splits > 1, "the shrink did not split K"
    assert_close_scaled("xa", xa.double(), _dropped(x.double(), 9, p) @ lora_A.double().T, lora_reductions(T, K, 8, r)["xa"],
                        dtype=torch.float32)
    if p > 0:
        assert torch.equal(triton_ops.unpack_keep_bits(bits, K).cpu(), fused_lora.dropout_mask(9, T, K, p))


@pytest.mark.parametrize("index,flatten", [(3, False), (5, False), (1, True)])
def test_triton_warp_specialised_tma_configs_do_not_flatten_on_sm90(triton_ops, monkeypatch, index, flatten):
    # Triton's persistent-matmul tutorial turns the loop flattening off for warp
    # specialisation on Hopper; the launcher derives FLATTEN from the config and the GPU.
    from fused_lora.kernels.common import TMA_GEMM_CONFIGS, GemmConfig
    from fused_lora.ops.triton_ops import plans

    device = _triton_device()
    if device.type == "cpu":
        monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
    elif torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("the rule is for sm_90")
    config = TMA_GEMM_CONFIGS[index]
    if device.type == "cpu":  # the interpreter's tile shape, the config's loop flags
        config = GemmConfig(32, 32, 32, GROUP_M=4, num_stages=1, num_warps=4, EPILOGUE_SUBTILE=config.EPILOGUE_SUBTILE,
                            WARP_SPECIALIZE=config.WARP_SPECIALIZE, FLATTEN=config.FLATTEN)
    monkeypatch.setattr(triton_ops.tuning, "_gemm_candidates",
                        lambda *args, **kwargs: [("tma:" + config.label(), "tma", config)])
    launches = []
    original = plans._Launch.__call__

    def record(self, *args):
        launches.append((self.fn.__name__, self.constexprs))
        return original(self, *args)

    monkeypatch.setattr(plans._Launch, "__call__", record)
    T, K, N, r = 40, 48, 32, 4
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, torch.float16, device)
    dy = torch.randn(T, N, device=device).half()
    got, _ = _run_all(triton_ops, x, weight, bias, lora_A, lora_B, dy, 3, 0.2, 0.5)
    tma = {name: c for name, c in launches if name in ("_lora_fwd_tma_kernel", "_lora_bwd_dx_tma_kernel")}
    assert len(tma) == 2 and all(c["FLATTEN"] is flatten and c["WARP_SPECIALIZE"] is config.WARP_SPECIALIZE
                                 for c in tma.values()), tma
    want = _expected(x, weight, bias, lora_A, lora_B, dy, 3, 0.2, 0.5)
    n = lora_reductions(T, K, N, r)
    for name in ("y", "dx"):
        assert_close_scaled(name, got[name].double(), want[name], n[name], dtype=torch.float16)


@pytest.mark.parametrize("path", ["tma", "pointer", "hybrid", "timed"])
def test_triton_caches_keep_no_user_tensor_alive(triton_ops, monkeypatch, path):
    # Every new T builds plans (and, the first time per shape class, tries or times the
    # candidates); none of that may keep the call's x and dy, or a deleted layer's
    # parameters, alive: with variable sequence lengths that would grow until out of memory.
    import gc
    import weakref

    device = _triton_device()
    dtype = torch.float16 if path in ("tma", "timed") else torch.float32
    if path in ("tma", "timed"):
        if device.type == "cpu":
            monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
        elif torch.cuda.get_device_capability(device)[0] < 9:
            pytest.skip("TMA needs sm_90")
    if path == "hybrid":
        original = triton_ops.tuning._gemm_candidates
        monkeypatch.setattr(triton_ops.tuning, "_gemm_candidates", lambda *args, **kwargs: [
            c for c in original(*args, **kwargs) if c[1] == "hybrid"] or [
            ("hybrid", "hybrid", triton_ops.tuning.INTERPRETER_GEMM_CONFIG)])
    timing = triton_ops.timing_runs() if path == "timed" else contextlib.nullcontext()
    if path == "timed" and device.type == "cpu":  # one interpreted run per candidate is enough here
        monkeypatch.setattr(triton_ops.tuning, "_time_ms", lambda fn, device: (fn(), 1.0)[1])
    layer = fused_lora.FusedLoRALinear(32, 48, r=4, lora_dropout=0.1, device=device, dtype=dtype)
    layer.backend = "triton"
    refs = {name: weakref.ref(t) for name, t in layer.named_parameters()}
    with timing:
        for T in (40, 56, 72):
            x = torch.randn(T, 32, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(T, 48, device=device, dtype=dtype)
            layer(x).backward(dy)
            refs[f"x (T={T})"], refs[f"dy (T={T})"] = weakref.ref(x), weakref.ref(dy)
            del x, dy
    assert triton_ops.plan_count() == 9  # three T, three plans each: the caches are full
    plans = list(triton_ops._FORWARD_PLANS.plans.values()) + list(triton_ops._BACKWARD_PLANS.plans.values())
    expected = {"tma": "tma:", "timed": "", "pointer": "pointer:", "hybrid": "hybrid"}[path]
    assert all((getattr(plan, "label", None) or plan.dx_label).startswith(expected) for plan in plans)
    if path == "timed":
        assert any(r["source"] == "timed" for r in triton_ops.tuning_report().values())
    del layer
    gc.collect()
    alive = [name for name, ref in refs.items() if ref() is not None]
    assert not alive, f"still alive after del and gc.collect(), held by a cache: {alive}"


# A transposed view of a huge tensor: x, dy and W whose column stride puts the last column past
# 2**31 elements. Run in a subprocess: before the launchers copied such tensors, the interpreter
# read outside them (a segmentation fault; on a GPU an illegal address or wrong values).
_COLUMN_OFFSETS_PAST_INT32 = r"""
import importlib.util
import torch
from fused_lora import lora_linear_reference
from fused_lora.ops import triton_ops as ops
from fused_lora.philox import keep_mask_torch
from tolerances import assert_close_scaled, lora_reductions

T, K, N, r, p, seed, scaling = 20, 40, 44, 3, 0.2, 77, 0.5
S = 2 ** 31 // (min(K, N) - 1) + 64  # x, W (K columns) and dy (N) all reach past 2**31 elements
try:  # 4.4 GiB of address space; only the pages the views touch are ever used
    base = torch.empty((max(K, N) - 1) * S + 256, dtype=torch.float16)
except RuntimeError as error:
    raise SystemExit(f"SKIP: {error}")
gen = torch.Generator().manual_seed(0)


def view(rows, cols, offset):  # (rows, cols), strides (1, S): column c starts at element c * S
    v = base.as_strided((rows, cols), (1, S), offset)
    v.copy_(torch.randn(rows, cols, generator=gen).half())
    return v


x, dy, W = view(T, K, 0), view(T, N, 64), view(N, K, 128)
b = torch.randn(N, generator=gen).half()
A = torch.randn(r, K, generator=gen) / K ** 0.5
B = torch.randn(N, r, generator=gen) / r ** 0.5
xa, bits = ops.lora_shrink(x, A, seed, p)
y = ops.lora_forward(x, W, b, B, xa, scaling)
got = dict(zip(("y", "dx", "dA", "dB"), (y,) + ops.lora_backward(dy, x, W, A, B, xa, scaling, seed, p, bits, True,
                                                                  True, True)))
keep = keep_mask_torch(seed, T, K, p, "cpu")
xr, Ar, Br = x.double().requires_grad_(True), A.double().requires_grad_(True), B.double().requires_grad_(True)
yr = lora_linear_reference(xr, W.double(), b.double(), Ar, Br, scaling, keep, p)
want = dict(zip(("y", "dx", "dA", "dB"), (yr,) + torch.autograd.grad(yr, (xr, Ar, Br), dy.double())))
n = lora_reductions(T, K, N, r)
for name in got:
    assert_close_scaled(name, got[name].double(), want[name], n[name], dtype=torch.float16)
plans = [*ops._SHRINK_PLANS.plans.values(), *ops._FORWARD_PLANS.plans.values(), *ops._BACKWARD_PLANS.plans.values()]
assert [(pl.copy_x, getattr(pl, "copy_w", None), getattr(pl, "copy_dy", None)) for pl in plans] == [
    (True, None, None), (True, True, None), (True, True, True)]
if importlib.util.find_spec("bitsandbytes"):  # the fused 4-bit forward reads x the same way
    from test_dequant_4bit import bitsandbytes_dequantized, quantized, weight_of

    param = quantized((N, K), 64, "nf4", True, seed=2)
    y4 = ops.lora_forward_4bit(x, weight_of(param, param.quant_state), b, B, xa, scaling)
    W4 = bitsandbytes_dequantized(param.data, param.quant_state, torch.float16).double()
    want4 = x.double() @ W4.T + scaling * (xa.double() @ B.double().T) + b.double()
    assert_close_scaled("y (4-bit)", y4, want4.half(), n["y"], dtype=torch.float16)
print("ok")
"""


def test_triton_column_offsets_past_int32_are_read_from_a_contiguous_copy():
    from fused_lora.ops.backends import triton_interpreter_problem

    if triton_interpreter_problem():  # (on a GPU machine's own stack; the pinned one has none)
        pytest.skip(triton_interpreter_problem())
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    done = subprocess.run([sys.executable, "-c", _COLUMN_OFFSETS_PAST_INT32], env=env, capture_output=True, text=True,
                          timeout=600, cwd=root)
    if done.returncode != 0 and "SKIP:" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stdout[-2000:],
                                                                         done.stderr[-4000:])
