"""Functional API: checks the arguments, picks the backend and the seed, calls the Function."""

from __future__ import annotations

import warnings

import torch

from .ops.backends import backend_name_for, backend_ops
from .checks import MAX_SCALING, check_dropout_p, check_lora_inputs, check_scaling, check_strided, type_name
from .dropout import draw_seed
from .function import FusedLoRAFunction, seed_argument
from .quantized import as_weight_4bit, is_8bit, refuse_8bit

TRITON_MAX_RANK = 256
_warned_frozen = False


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      dropout_p: float = 0.0, *, seed: int | None = None, training: bool = True,
                      backend: str | None = None) -> torch.Tensor:
    """``y = x W^T + b + scaling * (D(x) A^T) B^T``, fused.

    Args:
        x: (..., K) input, any leading dims and strides.
        weight: (N, K) frozen base weight; bias: (N,) or None, frozen. They
            never receive a gradient. A bitsandbytes 4-bit weight (``Params4bit``
            with its quant_state: NF4 or FP4, the weight of a ``Linear4bit``) is used
            in place: dequantized into a reused buffer in x's dtype (through the
            quant_state's dtype, as bitsandbytes does) for each GEMM, never saved
            dense (``fused_lora.quantized``). The bias then must be in x's dtype too.
        lora_A: (r, K), lora_B: (N, r): the trainable adapters; x's dtype, or
            fp32 when x is fp16/bf16.
        scaling: the LoRA scale (lora_alpha / r, or lora_alpha / sqrt(r)).
        dropout_p: dropout probability on the LoRA branch input, in [0, 1);
            applied only when ``training`` is True.
        seed: int in [0, 2**63) fixing the dropout mask (see
            ``fused_lora.dropout_mask``), or a 0-d int64 tensor holding one
            (read by the kernels on the device: safe to capture in a CUDA
            graph). None draws one from torch's generator of x's device, and
            only when dropout is active; on CUDA the draw stays on the GPU, so
            every replay of a captured graph draws a new mask. With seed=None a
            compiled call and an eager call draw different masks (as
            ``nn.Dropout`` does under inductor, whose RNG differs from eager's).
            A seed tensor changed in place between forward and backward: the
            cpu backend's one-node C++ path (eager, CPU seed) uses the forward's
            seed, the other paths raise autograd's in-place error; both are safe.
        backend: None (automatic), "triton", "cpu" or "torch". Under
            torch.compile the backend is chosen when the function is traced
            (this argument, else ``FUSED_LORA_BACKEND``, else the automatic
            choice) and fixed in the compiled code: setting
            ``FUSED_LORA_BACKEND`` later changes eager calls only. Pass
            ``backend=`` (a changed argument recompiles), or call
            ``torch.compiler.reset()`` after changing the variable.

    Returns:
        (..., N) tensor in x's dtype.
    """
    autocast = False
    if isinstance(x, torch.Tensor):
        device = x.device
        if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
            autocast = True
            x, weight, bias, lora_A, lora_B = _autocast_inputs(x, weight, bias, lora_A, lora_B)
    w4 = None
    check_weight = weight
    if type(weight) is not torch.Tensor and type(weight) is not torch.nn.Parameter:
        w4 = as_weight_4bit(weight)
        if w4 is not None:
            # NOTE: the checks read a 4-bit weight as its dense (N, K) self in x's dtype.
            dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float32
            check_weight = w4.dense_stand_in(dtype)
        elif is_8bit(weight):
            refuse_8bit("weight", weight)
    check_lora_inputs(x, check_weight, bias, lora_A, lora_B)
    # NOTE: the common case (Python floats in range) skips the generic checks' ABC isinstance calls.
    if type(scaling) is not float or not -MAX_SCALING <= scaling <= MAX_SCALING:
        scaling = check_scaling(scaling)
    if type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0:
        dropout_p = check_dropout_p(dropout_p)
    if training is not True and training is not False:
        raise TypeError(f"training: expected a bool, got {type_name(training)}")
    if seed is not None:
        seed = seed_argument(seed)
        if isinstance(seed, torch.Tensor) and seed.device.type not in ("cpu", device.type):
            raise ValueError(f"seed: expected a 0-d int64 tensor on the CPU or on x's device ({device}), "
                             f"got one on {seed.device}")
    name = _backend_name(device, backend)
    if name == "triton":
        if lora_A.shape[0] > TRITON_MAX_RANK:
            raise ValueError(f"lora_A: the triton backend supports rank r <= {TRITON_MAX_RANK}, "
                             f"got r={lora_A.shape[0]}")
        if device.type == "cpu" and x.dtype == torch.bfloat16:
            # NOTE: Triton's interpreter computes bf16 silently wrong; refuse rather than return garbage.
            raise ValueError("x: bfloat16 on CPU is not supported by the triton backend (Triton's interpreter "
                             "computes bf16 wrongly); use backend='torch' or CUDA tensors")
    if w4 is not None and isinstance(weight, torch.Tensor):
        check_weight = weight  # a Params4bit's own requires_grad
    if not _warned_frozen and (check_weight.requires_grad or (bias is not None and bias.requires_grad)):
        _warn_if_base_trainable(check_weight, bias)

    if not training or dropout_p == 0.0:
        dropout_p, seed = 0.0, None
    elif seed is None:
        seed = draw_seed(device)
    # NOTE: (..., K) -> (T, K) and back out here, not inside the Function: autograd forbids
    # modifying in place (y += residual, ReLU(inplace=True)) a view created inside a custom Function.
    # One reshape serves both roads (a copy when x is not viewable as (T, K)).
    out_features, in_features = weight.shape if w4 is None else w4.shape
    # NOTE: the layouts are checked only once a backend failed (a try costs nothing until it raises):
    # a sparse or MKL-DNN tensor then gets a TypeError naming it instead of the backend's own error.
    try:
        x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
        y2d = None
        if name == "cpu" and w4 is None and not autocast and not torch.compiler.is_compiling():
            y2d = _cpu_layer(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        if y2d is None:
            # NOTE: eager calls pass the Weight4bit read above; torch.compile traces the Params4bit itself.
            base = weight if w4 is None or torch.compiler.is_compiling() else w4
            y2d = FusedLoRAFunction.apply(x2d, base, bias, lora_A, lora_B, scaling, dropout_p, seed, name)
    except (RuntimeError, NotImplementedError):
        check_strided(x, check_weight, bias, lora_A, lora_B)
        raise
    return y2d if x.dim() == 2 else y2d.view(*x.shape[:-1], out_features)


def _cpu_layer(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The cpu backend's one-node C++ autograd path (``cpu_ops.lora_linear``) for a (T, K) x, or None
    where it does not apply: no rows, a seed tensor off the CPU, or a shape outside the fused path."""
    if isinstance(seed, torch.Tensor) and seed.device.type != "cpu":
        return None
    if x2d.shape[0] == 0:
        return None
    return backend_ops("cpu").lora_linear(x2d, weight, bias, lora_A, lora_B, scaling, seed, dropout_p)


@torch.compiler.assume_constant_result
def _backend_name(device: torch.device, backend: str | None) -> str:
    # NOTE: under torch.compile the choice is made once, at trace time, not traced
    # (backends.py caches what it found with lru_cache, which dynamo would warn about).
    return backend_name_for(device, backend)


def _autocast_inputs(x, weight, bias, lora_A, lora_B):
    """Cast as autocast casts ``F.linear``'s inputs: floating tensors but fp64 go to the autocast dtype.

    fp32 adapters stay fp32 (the LoRA branch is then computed in fp32, as PEFT's default
    fp32 adapters are); adapters in another dtype follow x.
    """
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    x, weight, bias = cast(x), cast(weight), cast(bias)
    if x.dtype == dtype and dtype in (torch.float16, torch.bfloat16):
        if isinstance(lora_A, torch.Tensor) and lora_A.dtype != torch.float32:
            lora_A, lora_B = cast(lora_A), cast(lora_B)
    return x, weight, bias, lora_A, lora_B


def _warn_if_base_trainable(weight, bias) -> None:
    global _warned_frozen
    if _warned_frozen or not torch.is_grad_enabled():
        return
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        _warned_frozen = True
        warnings.warn("fused_lora_linear: weight/bias require grad, but fused_lora treats the base "
                      "layer as frozen and never computes their gradients (they stay None). "
                      "Call .requires_grad_(False) on them to silence this warning.", stacklevel=3)
