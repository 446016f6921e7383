"""Argument checks shared by the functional API, the module and the backends.

Every failure is a ``TypeError`` (wrong kind of object or dtype) or a
``ValueError`` (wrong value or shape) whose message names the argument and
says what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_SEED = 2 ** 63
# NOTE: every backend applies scaling in fp32 for fp16/bf16/fp32 inputs, and the Triton
# kernels take scalar arguments as fp32 for every dtype (fp64 included, as an fp32
# hi + lo pair); so one range for every dtype: |scaling| <= the largest finite fp32.
MAX_SCALING = torch.finfo(torch.float32).max


def type_name(value) -> str:
    """``type(value).__name__``, qualified by its module outside builtins (``numpy.bool``, not ``bool``)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _require_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} {meaning}, got {tuple(tensor.shape)}")


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    """A dropout probability in [0, 1); ``name`` is the argument's name in messages."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a float in [0, 1), got {dropout_p}")
    return dropout_p


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int in [0, 2**63), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")
    return seed


def check_seed_tensor(seed) -> torch.Tensor:
    """The seed of ``FusedLoRAFunction.apply``, as the operations take it: a 0-d int64 tensor.

    Accepts an int in [0, 2**63) (converted to a 0-d int64 CPU tensor) or a dense 0-d
    int64 tensor holding one. A float, a bool, a float or sparse tensor is a TypeError, never
    truncated or read deep inside a backend. The value of a CPU tensor is checked on every
    road: here in eager calls, and by the custom ops when the compiled function runs
    (``check_seed_value``; a traced tensor has no value yet). The value of a CUDA seed tensor
    is never checked: reading it would synchronise (a negative one selects the mask of its
    two's-complement value, 2**64 + seed, on every road alike).
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64:
            raise TypeError(f"seed: expected an int in [0, 2**63) or a 0-d int64 tensor holding one, "
                            f"got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        if seed.layout != torch.strided:
            raise TypeError(f"seed: expected a dense (strided) 0-d int64 tensor, got layout {seed.layout}")
        if seed.device.type == "cpu" and not torch.compiler.is_compiling():
            check_seed_value(int(seed.item()))
        return seed
    return torch.tensor(check_seed(seed), dtype=torch.int64)


def check_seed_value(value: int) -> int:
    """The value read from a seed tensor: in [0, 2**63) (an int64 cannot be larger)."""
    if value < 0:
        raise ValueError(f"seed: expected an int in [0, 2**63), got tensor({value})")
    return value


def check_scaling(scaling) -> float:
    """A real number with |scaling| <= MAX_SCALING (the largest fp32), as a Python float."""
    if isinstance(scaling, torch.Tensor) and scaling.dim() == 0:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a finite real number, got {type(scaling).__name__}")
    try:
        scaling = float(scaling)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"scaling: expected a value in [-{MAX_SCALING:.9g}, {MAX_SCALING:.9g}], got an "
                         f"integer too large for a float") from None
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite real number, got {scaling}")
    if abs(scaling) > MAX_SCALING:
        raise ValueError(f"scaling: expected a value in [-{MAX_SCALING:.9g}, {MAX_SCALING:.9g}] (the "
                         f"float32 range, in which the backends apply it), got {scaling:.9g}")
    return scaling


def is_finite_real(value) -> bool:
    """A real number (not a bool) that is finite as a Python float: not NaN, not Inf, and not
    an int too large to convert (``float(10**400)`` raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def plain_number(value):
    """A real number as a Python int (integral values) or float, e.g. for JSON (numpy scalars are not)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r: expected an int >= 1, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r}")
    return int(r)


def check_dims(rows, cols) -> tuple[int, int]:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return int(rows), int(cols)


def _in_features(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> int:
    """K, agreed by x's last dimension and weight; a disagreement blames the tensor that is wrong.

    When x and weight disagree, lora_A's in_features (or a weight that fits transposed)
    says which of the two is the odd one out; without that evidence x is blamed.
    """
    x_features = x.shape[-1]
    out_features, in_features = weight.shape
    if x_features == in_features:
        if in_features < 1:
            raise ValueError(f"weight: expected in_features >= 1 and out_features >= 1, "
                             f"got shape {tuple(weight.shape)}")
        return in_features
    if out_features == x_features or lora_A.shape[1] == x_features:
        hint = "; it looks transposed" if out_features == x_features else ""
        raise ValueError(f"weight: expected shape (out_features, {x_features}) with in_features = x's last "
                         f"dimension {x_features}, got {tuple(weight.shape)}{hint}")
    raise ValueError(f"x: expected last dimension {in_features} (weight's in_features), got shape {tuple(x.shape)}")


def _valid_fast(x, weight, bias, lora_A, lora_B) -> bool:
    """True when the call is plainly valid, decided with few attribute reads (the hot path of
    every call); False sends it to the full checks, which say what is wrong."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and (bias is None or isinstance(bias, Tensor))):
        return False
    x_shape, w_shape, a_shape, b_shape = x.shape, weight.shape, lora_A.shape, lora_B.shape
    if len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2 or not x_shape:
        return False
    out_features, in_features = w_shape
    r = a_shape[0]
    if (x_shape[-1] != in_features or a_shape[1] != in_features or b_shape[0] != out_features or b_shape[1] != r
            or in_features < 1 or out_features < 1 or r < 1):
        return False
    dtype, adapter_dtype = x.dtype, lora_A.dtype
    if (dtype not in SUPPORTED_DTYPES or weight.dtype != dtype or lora_B.dtype != adapter_dtype
            or (adapter_dtype != dtype and not (adapter_dtype == torch.float32 and dtype in HALF_DTYPES))):
        return False
    device = x.device
    if weight.device != device or lora_A.device != device or lora_B.device != device:
        return False
    return bias is None or (bias.shape == (out_features,) and bias.dtype == dtype and bias.device == device)


def check_strided(x, weight, bias, lora_A, lora_B) -> None:
    """A TypeError naming the first tensor that is not dense (sparse, MKL-DNN, ...): the backends read
    strided memory. Not on the fast path: called once a backend has failed."""
    for name, value in (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")


def check_lora_inputs(x, weight, bias, lora_A, lora_B) -> None:
    """Shapes, dtypes and devices of the tensors of one LoRA linear call."""
    if _valid_fast(x, weight, bias, lora_A, lora_B):
        return
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)

    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape (..., in_features), got a 0-d tensor")
    for name, value, meaning in (("weight", weight, "(out_features, in_features)"),
                                 ("lora_A", lora_A, "(r, in_features)")):
        if value.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor {meaning}, got shape {tuple(value.shape)}")
    in_features = _in_features(x, weight, lora_A)
    out_features = weight.shape[0]
    if out_features < 1:
        raise ValueError(f"weight: expected in_features >= 1 and out_features >= 1, got shape {tuple(weight.shape)}")
    if lora_A.shape[1] != in_features:
        hint = "; it looks transposed" if lora_A.shape[0] == in_features else ""
        raise ValueError(f"lora_A: expected shape (r, {in_features}) (r, in_features), "
                         f"got {tuple(lora_A.shape)}{hint}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if lora_B.dim() == 2 and tuple(lora_B.shape) == (r, out_features) and r != out_features:
        raise ValueError(f"lora_B: expected shape {(out_features, r)} (out_features, r) with r from lora_A, "
                         f"got {tuple(lora_B.shape)}; it looks transposed")
    _require_shape("lora_B", lora_B, (out_features, r), "(out_features, r) with r from lora_A")
    if bias is not None:
        _require_shape("bias", bias, (out_features,), "(out_features,)")

    for name, value in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if value is not None and value.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's device), got {value.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (x's dtype), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected dtype {x.dtype} (x's dtype), got {bias.dtype}")
    allowed = (x.dtype, torch.float32) if x.dtype in HALF_DTYPES else (x.dtype,)
    if lora_A.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"lora_A: expected dtype {names} for x of dtype {x.dtype}, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: expected dtype {lora_A.dtype} (lora_A's dtype), got {lora_B.dtype}")
