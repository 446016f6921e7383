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
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(lora_dropout=1.0), "dropout_p"),
    (dict(lora_alpha=math.inf), "lora_alpha"), (dict(in_features=0), "in_features"),
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
