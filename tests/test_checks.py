"""Bad input: a ValueError or TypeError naming the argument, never a crash or a silent result."""

import math

import pytest
import torch

import fused_lora
from fused_lora import FusedLoRALinear, dropout_mask, fused_lora_linear, lora_linear_reference


def good(**overrides):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
                lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2), scaling=1.0)
    args.update(overrides)
    return args


CASES = [
    ("x", TypeError, good(x=[[1.0] * 8])),
    ("x", TypeError, good(x=torch.ones(4, 8, dtype=torch.int64))),
    ("x", ValueError, good(x=torch.randn(4, 7))),
    ("x", ValueError, good(x=torch.tensor(1.0))),
    ("weight", ValueError, good(weight=torch.randn(6, 8, 1))),
    ("weight", TypeError, good(weight=torch.randn(6, 8, dtype=torch.float64))),
    ("weight", ValueError, good(weight=torch.randn(6, 8, device="meta"))),
    ("bias", ValueError, good(bias=torch.randn(5))),
    ("bias", TypeError, good(bias=torch.randn(6, dtype=torch.float16))),
    ("lora_A", ValueError, good(lora_A=torch.randn(2, 7))),
    ("lora_A", ValueError, good(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0))),
    ("lora_A", TypeError, good(lora_A=torch.randn(2, 8, dtype=torch.float16))),
    ("lora_A", TypeError, good(x=torch.randn(4, 8, dtype=torch.float16),
                               weight=torch.randn(6, 8, dtype=torch.float16),
                               bias=None, lora_A=torch.randn(2, 8, dtype=torch.float64),
                               lora_B=torch.randn(6, 2, dtype=torch.float64))),
    ("lora_B", ValueError, good(lora_B=torch.randn(6, 3))),
    ("lora_B", ValueError, good(lora_B=torch.randn(2, 6))),
    ("lora_B", TypeError, good(lora_B=torch.randn(6, 2, dtype=torch.float64))),
    ("scaling", ValueError, good(scaling=math.inf)),
    ("scaling", ValueError, good(scaling=math.nan)),
    ("scaling", TypeError, good(scaling="2")),
    ("scaling", ValueError, good(scaling=-10 ** 400)),  # an int beyond float: once an OverflowError
]


@pytest.mark.parametrize("argument,error,args", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("entry", ["fused", "reference"])
def test_bad_tensors_and_scaling(entry, argument, error, args):
    fn = fused_lora_linear if entry == "fused" else lora_linear_reference
    with pytest.raises(error, match=argument):
        fn(*args.values())


@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.0, ValueError), (math.nan, ValueError),
                                     ("0.1", TypeError), (None, TypeError)])
def test_bad_dropout_p(p, error):
    with pytest.raises(error, match="dropout_p"):
        fused_lora_linear(*good().values(), p, seed=1)
    with pytest.raises(error, match="dropout_p"):
        dropout_mask(1, 2, 2, p)


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2 ** 63, ValueError), (1.5, TypeError),
                                        (True, TypeError)])
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        fused_lora_linear(*good().values(), 0.1, seed=seed)
    with pytest.raises(error, match="seed"):
        dropout_mask(seed, 2, 2, 0.1)


def test_bad_mask_shape_and_backend():
    with pytest.raises(ValueError, match="rows"):
        dropout_mask(1, -1, 2, 0.1)
    with pytest.raises(ValueError, match="keep_mask"):
        lora_linear_reference(*good().values(), keep_mask=torch.ones(3, 8, dtype=torch.bool), dropout_p=0.1)
    with pytest.raises(TypeError, match="keep_mask"):
        lora_linear_reference(*good().values(), keep_mask=torch.ones(4, 8), dropout_p=0.1)
    with pytest.raises(ValueError, match="backend"):
        fused_lora_linear(*good().values(), backend="cuda")
    with pytest.raises(TypeError, match="training"):
        fused_lora_linear(*good().values(), training=1)


def test_triton_interpreter_refuses_bf16():
    args = good(x=torch.randn(4, 8, dtype=torch.bfloat16), weight=torch.randn(6, 8, dtype=torch.bfloat16),
                bias=None, lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2))
    with pytest.raises(ValueError, match="x: bfloat16|TRITON_INTERPRET"):  # the latter on GPU machines
        fused_lora_linear(*args.values(), backend="triton")
    assert fused_lora_linear(*args.values(), backend="torch").dtype == torch.bfloat16


def test_triton_rank_limit():
    args = good(lora_A=torch.randn(257, 8), lora_B=torch.randn(6, 257))
    with pytest.raises(ValueError, match="lora_A"):
        fused_lora_linear(*args.values(), backend="triton")
    # The torch backend has no such limit.
    assert fused_lora_linear(*args.values(), backend="torch").shape == (4, 6)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_alpha=math.inf), "lora_alpha"), (dict(in_features=0), "in_features"),
    (dict(lora_alpha=10 ** 400), "lora_alpha"),
    (dict(dtype=torch.int32), "dtype"), (dict(dtype="float32"), "dtype"),  # once torch's raw errors
])
def test_bad_module_arguments(kwargs, argument):
    args = dict(in_features=8, out_features=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        FusedLoRALinear(**args)
    with pytest.raises(TypeError, match="linear"):
        FusedLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_trainable_base_weight_warns_once():
    fused_lora.functional._warned_frozen = False
    args = good(weight=torch.randn(6, 8, requires_grad=True))
    with pytest.warns(UserWarning, match="frozen"):
        fused_lora_linear(*args.values())


# --------------------------------------------------------------------------- scaling range (issue 8, item 4)

def test_scaling_range_is_the_float32_range():
    from fused_lora.checks import MAX_SCALING, check_scaling
    assert MAX_SCALING == torch.finfo(torch.float32).max
    assert check_scaling(MAX_SCALING) == MAX_SCALING and check_scaling(-MAX_SCALING) == -MAX_SCALING
    assert check_scaling(torch.tensor(0.5)) == 0.5
    for bad in (1e39, -1e39, MAX_SCALING * (1 + 1e-15)):
        with pytest.raises(ValueError, match=r"scaling: expected a value in \[-3.40282347e\+38, 3.40282347e\+38\]"):
            check_scaling(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_outside_the_range_is_refused_on_every_backend(device_backend, dtype):
    device, backend = device_backend
    args = {k: v.to(device=device, dtype=dtype) for k, v in good().items() if k != "scaling"}
    for scaling in (1e39, -1e300):
        with pytest.raises(ValueError, match="scaling"):
            fused_lora_linear(*args.values(), scaling, 0.1, seed=3, backend=backend)
        with pytest.raises(ValueError, match="scaling"):
            lora_linear_reference(*args.values(), scaling)
    with pytest.raises(ValueError, match="lora_alpha.*scaling"):
        FusedLoRALinear(8, 4, r=1, lora_alpha=1e39)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scaling_inside_the_range_matches_the_reference(device_backend, dtype):
    """scaling = 1e37 with lora_B ~ 1e-37: every intermediate stays finite, and so do the results."""
    from conftest import run_forward_backward
    from tolerances import assert_close_scaled, lora_reductions

    device, backend = device_backend
    gen = torch.Generator().manual_seed(11)
    T, K, N, r, scaling, p, seed = 5, 16, 8, 4, 1e37, 0.25, 9
    x, weight, bias = torch.randn(T, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    lora_A, lora_B = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen) * 1e-37
    dy = torch.randn(T, N, generator=gen)
    x, weight, bias, lora_A, lora_B, dy = (t.to(dtype) for t in (x, weight, bias, lora_A, lora_B, dy))
    mask = dropout_mask(seed, T, K, p)

    def fused(x_, a, b):
        return fused_lora_linear(x_, weight.to(device), bias.to(device), a, b, scaling, p, seed=seed, backend=backend)

    def reference(x_, a, b):
        return lora_linear_reference(x_, weight, bias, a, b, scaling, keep_mask=mask, dropout_p=p)

    got = run_forward_backward(fused, x.to(device), lora_A.to(device), lora_B.to(device), dy.to(device))
    expected = run_forward_backward(reference, x, lora_A, lora_B, dy)
    reductions = lora_reductions(T, K, N, r)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert torch.isfinite(e).all() and e.abs().max() > 0, name
        assert_close_scaled(name, g.cpu(), e, reductions[name])


# --------------------------------------------------------------------------- messages name the wrong tensor (item 6)

def test_transposed_lora_A_names_lora_A_with_the_right_rank():
    x, weight, lora_A, lora_B = torch.randn(3, 32), torch.randn(16, 32), torch.randn(8, 32), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"lora_A: expected shape \(r, 32\) \(r, in_features\), "
                                         r"got \(32, 8\); it looks transposed"):
        fused_lora_linear(x, weight, None, lora_A.t(), lora_B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B: expected shape \(16, 8\).*got \(8, 16\); it looks transposed"):
        fused_lora_linear(x, weight, None, lora_A, lora_B.t(), 1.0)


def test_wrong_weight_or_x_names_the_tensor_that_is_wrong():
    x, weight, lora_A, lora_B = torch.randn(3, 32), torch.randn(16, 32), torch.randn(8, 32), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \(out_features, 32\).*got \(32, 16\); "
                                         r"it looks transposed"):
        fused_lora_linear(x, weight.t(), None, lora_A, lora_B, 1.0)
    # weight is wrong (not transposed): x and lora_A agree on in_features = 32.
    with pytest.raises(ValueError, match=r"weight: expected shape \(out_features, 32\)"):
        fused_lora_linear(x, torch.randn(16, 30), None, lora_A, lora_B, 1.0)
    # x is wrong: weight and lora_A agree on 32.
    with pytest.raises(ValueError, match=r"x: expected last dimension 32"):
        fused_lora_linear(torch.randn(3, 30), weight, None, lora_A, lora_B, 1.0)


# --------------------------------------------------------------------------- module attributes and the seed (item 6)

def test_lora_dropout_and_scaling_are_checked_when_set():
    layer = FusedLoRALinear(8, 4, r=2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout: expected a float in"):
        layer.lora_dropout = 1.5
    with pytest.raises(TypeError, match="lora_dropout"):
        layer.lora_dropout = "0.1"
    assert layer.lora_dropout == 0.1
    layer.lora_dropout = 0.25
    assert layer.lora_dropout == 0.25 and "lora_dropout=0.25" in repr(layer)
    with pytest.raises(ValueError, match="scaling"):
        layer.scaling = math.inf
    with pytest.raises(ValueError, match="scaling"):
        layer.scaling = 1e39
    assert layer.scaling == 4.0


@pytest.mark.parametrize("seed,error", [
    (2.5, TypeError), (True, TypeError), (-1, ValueError), (2 ** 63, ValueError),
    (torch.tensor(5.7), TypeError), (torch.tensor(True), TypeError), (torch.tensor([5]), TypeError),
    (torch.tensor(5, dtype=torch.int32), TypeError), (torch.tensor(-3), ValueError),
])
def test_seed_tensor_check_refuses_what_would_be_truncated(seed, error):
    from fused_lora.checks import check_seed_tensor
    with pytest.raises(error, match="seed"):
        check_seed_tensor(seed)


def test_seed_tensor_check_passes_valid_seeds_through():
    from fused_lora.checks import check_seed_tensor
    seed = torch.tensor(2 ** 63 - 1)
    assert check_seed_tensor(seed) is seed
    converted = check_seed_tensor(7)
    assert converted.dtype == torch.int64 and converted.dim() == 0 and converted.item() == 7


@pytest.mark.parametrize("seed,error", [(2.5, TypeError), (torch.tensor(5.7), TypeError), (-1, ValueError),
                                        (torch.tensor(-1), ValueError)])
def test_function_apply_validates_the_seed_on_every_backend(device_backend, seed, error):
    """The exported Function refuses what it would truncate, and negative seeds, the same way everywhere."""
    device, backend = device_backend
    args = {k: v.to(device) for k, v in good().items() if k != "scaling"}
    with pytest.raises(error, match="seed"):
        fused_lora.FusedLoRAFunction.apply(*args.values(), 1.0, 0.1, seed, backend)


def test_sparse_seed_tensor_is_a_clear_error_on_every_backend(device_backend):
    # Before: the cpu backend failed deep inside ("Cannot access data pointer of Tensor that
    # doesn't have storage").
    device, backend = device_backend
    args = {k: v.to(device) for k, v in good().items() if k != "scaling"}
    sparse = torch.tensor(5).to_sparse()
    assert sparse.dim() == 0 and sparse.dtype == torch.int64
    with pytest.raises(TypeError, match="seed: expected a dense .strided. 0-d int64 tensor, got layout torch.sparse_coo"):
        fused_lora_linear(*args.values(), 1.0, 0.1, seed=sparse, backend=backend)
    with pytest.raises(TypeError, match="seed: expected a dense"):
        fused_lora.FusedLoRAFunction.apply(*args.values(), 1.0, 0.1, sparse, backend)


@pytest.mark.parametrize("dropout_p,seed,backend,error,argument", [
    (0.1, None, None, ValueError, "seed"),          # once a raw TypeError / pybind11 cast error
    (1.5, 3, None, ValueError, "dropout_p"),        # once computed silently (torch, triton)
    (math.nan, 3, None, ValueError, "dropout_p"),   # once read as "no dropout"
    ("0.1", 3, None, TypeError, "dropout_p"),
    (0.0, None, "nope", ValueError, "backend"),     # once a raw KeyError
    (0.0, None, "missing", ValueError, "backend"),
])
def test_function_apply_validates_dropout_seed_and_backend(device_backend, dropout_p, seed, backend, error, argument):
    device, name = device_backend
    backend = name if backend is None else None if backend == "missing" else backend
    args = {k: v.to(device) for k, v in good().items() if k != "scaling"}
    with pytest.raises(error, match=argument):
        fused_lora.FusedLoRAFunction.apply(*args.values(), 1.0, dropout_p, seed, backend)


def test_a_bool_lookalike_is_named_by_its_full_type():
    # numpy.bool_'s __name__ is "bool": the message once read "expected a bool, got bool".
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"training: expected a bool, got numpy\.bool"):
        fused_lora_linear(*good().values(), training=np.bool_(True))
    with pytest.raises(TypeError, match=r"use_rslora: expected a bool, got numpy\.bool"):
        fused_lora.apply_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], use_rslora=np.bool_(True))


def test_seed_tensor_on_a_foreign_device_names_the_seed(device_backend):
    # Once a raw error of each backend ("Cannot copy out of meta tensor", "Tensor.item() cannot be
    # called on meta tensors", a C++ check).
    device, backend = device_backend
    args = {k: v.to(device) for k, v in good().items() if k != "scaling"}
    with pytest.raises(ValueError, match="seed"):
        fused_lora_linear(*args.values(), 1.0, 0.1, seed=torch.tensor(3, device="meta"), backend=backend)


@pytest.mark.parametrize("argument,layout", [("weight", "sparse"), ("bias", "sparse"), ("x", "mkldnn")])
def test_non_dense_tensors_name_the_tensor_on_every_backend(device_backend, argument, layout):
    # Once each backend's own error ("Cannot access data pointer of Tensor that doesn't have storage",
    # "addmm_sparse_dense: ...", a C++ RuntimeError). The torch backend computes a sparse x or
    # lora_A correctly, so those stay accepted there.
    device, backend = device_backend
    if device.type != "cpu" or (layout == "mkldnn" and not torch.backends.mkldnn.is_available()):
        pytest.skip("CPU layouts")
    args = good()
    args[argument] = args[argument].to_sparse() if layout == "sparse" else args[argument].to_mkldnn()
    with pytest.raises(TypeError, match=rf"{argument}: expected a dense \(strided\) tensor"):
        fused_lora_linear(*args.values(), backend=backend)
