"""4-bit frozen bases (QLoRA): a bitsandbytes ``Params4bit`` read in place, and its dense weight on demand.

bitsandbytes stores a 4-bit weight (``bitsandbytes.nn.Params4bit``, the weight of a
``Linear4bit``) as packed nibbles plus a ``QuantState``. ``weight_4bit`` reads both as a
``Weight4bit``, referencing the same tensors: no copy, no repacking, nothing modified.

Layout (bitsandbytes 0.50.2): the (N, K) weight is flattened and split into blocks of
``blocksize`` (64 for ``Linear4bit``) consecutive elements, one absmax per block; two
elements per byte, the first in the high nibble. Element i is, in fp32,
``code[nibble_i] * a`` with ``a = absmax[i // blocksize]``, or with double quantization
(``compress_statistics=True``, the default) ``a = nested_code[absmax[b]] *
nested_absmax[b // nested_blocksize] + offset`` (b = i // blocksize; the product rounded
to fp32 before the offset is added), then rounded to ``quant_state.dtype``. That is
``bitsandbytes.functional.dequantize_4bit``, bit for bit; a compute dtype other than
``quant_state.dtype`` gets that result cast once more, as bitsandbytes' matmul does
(``dequantize_4bit(...).to(x.dtype)``).
NOTE: for FP4, nibble 8 (a sign bit over a zero magnitude) dequantizes to +0.0 from the
code book here and in bitsandbytes' PyTorch path, to -0.0 in its C++ CPU kernel: equal
values, different bits.

The fused op never keeps a dense copy: the forward dequantizes into a buffer owned by
this module (one per device and dtype, grown to the largest weight, reused by every layer
and call, never a user tensor), runs the dense path, and saves only the packed weight's
references for backward, which dequantizes again for dx (``dequantized``).
``release_buffers()`` frees the buffers. A backend may run its own 4-bit GEMMs for a call
instead (``lora_forward_4bit_tiled`` / ``lora_backward_4bit_tiled`` in its ops module, returning None
where it does not): the cpu backend dequantizes tile by tile in cache for few fp32 rows
(``fused_lora.ops.cpu_ops.MAX_ROWS_4BIT_TILED``), where the whole buffer would cost as much as
the GEMM.

Supported: NF4 and FP4, with and without double quantization, any ``quant_storage``
(the bytes are viewed as uint8), compute dtypes fp16, bf16, fp32 (and fp64, from the
fp32 values). Refused with a ValueError naming the type: 8-bit weights (``Int8Params``,
``Linear8bitLt``), a ``Params4bit`` not quantized yet (no ``quant_state``), and one that
bitsandbytes repacked for its CPU inference kernel (``quant_state.packing_format_for_cpu``).

bitsandbytes is optional (``pip install .[qlora]``): nothing here imports it except
``require_bitsandbytes``, which says which extra to install when it is missing. A weight
is recognised as 4-bit only when bitsandbytes is already imported (a ``Params4bit``
cannot exist otherwise).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch

QLORA_EXTRA = "pip install .[qlora]"
BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")


class Weight4bit:
    """A bitsandbytes 4-bit weight, read in place (the fields of the 4-bit contract).

    ``packed`` uint8 bytes of the packed nibbles (the Params4bit's own storage, viewed as
    uint8; at least (N*K+1)//2 bytes); ``shape`` (N, K); ``blocksize``; ``quant_type``
    "nf4" or "fp4"; ``code`` fp32 (16,); ``absmax`` fp32 (blocks,), or uint8 when
    ``nested``; with ``nested``: ``nested_code`` fp32 (256,), ``nested_absmax`` fp32,
    ``nested_blocksize``, ``offset`` (a float or a 0-d fp32 tensor); ``dtype`` the
    quant_state's dtype (what bitsandbytes dequantizes to).
    """

    __slots__ = ("packed", "shape", "blocksize", "quant_type", "code", "absmax", "nested", "nested_code",
                 "nested_absmax", "nested_blocksize", "offset", "dtype")

    def __init__(self, packed, shape, blocksize, quant_type, code, absmax, nested=False, nested_code=None,
                 nested_absmax=None, nested_blocksize=0, offset=0.0, dtype=torch.float32):
        self.packed = packed
        self.shape = (int(shape[0]), int(shape[1]))
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        self.code = code
        self.absmax = absmax
        self.nested = bool(nested)
        self.nested_code = nested_code
        self.nested_absmax = nested_absmax
        self.nested_blocksize = int(nested_blocksize)
        self.offset = offset
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dense_stand_in(self, dtype: torch.dtype) -> torch.Tensor:
        """A one-element tensor expanded to (N, K) in ``dtype`` on the packed weight's device: for code that
        reads only a dense weight's shape, dtype and device (argument checks, a backward without dx)."""
        return self.packed.new_empty((1, 1), dtype=dtype).expand(self.shape)

    def tensors(self) -> tuple:
        """(packed, absmax, code, nested_absmax, nested_code, offset): the tensors, for custom ops and
        save_for_backward (None where absent; a float offset becomes a 0-d fp32 tensor)."""
        offset = self.offset
        if self.nested and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32)
        return (self.packed, self.absmax, self.code, self.nested_absmax if self.nested else None,
                self.nested_code if self.nested else None, offset if self.nested else None)

    def meta(self) -> tuple:
        """(N, K, blocksize, nested_blocksize, quant_type, dtype): the constants beside ``tensors()``."""
        return (self.shape[0], self.shape[1], self.blocksize, self.nested_blocksize, self.quant_type, self.dtype)

    @classmethod
    def from_parts(cls, tensors, meta) -> "Weight4bit":
        """The inverse of (``tensors()``, ``meta()``)."""
        packed, absmax, code, nested_absmax, nested_code, offset = tensors
        out_features, in_features, blocksize, nested_blocksize, quant_type, dtype = meta
        nested = nested_absmax is not None
        return cls(packed, (out_features, in_features), blocksize, quant_type, code, absmax, nested,
                   nested_code, nested_absmax, nested_blocksize, offset if nested else 0.0, dtype)

    def __repr__(self) -> str:
        nested = f", nested (blocksize {self.nested_blocksize})" if self.nested else ""
        return (f"Weight4bit({self.quant_type}, shape={self.shape}, blocksize={self.blocksize}{nested}, "
                f"dtype={self.dtype}, device={self.device})")


# ---------------------------------------------------------------------------------------------
# Recognising bitsandbytes weights and layers (never importing bitsandbytes)
# ---------------------------------------------------------------------------------------------

def _bnb_attr(module: str, name: str):
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def params4bit_type():
    """``bitsandbytes.nn.Params4bit``, or None when bitsandbytes is not imported."""
    return _bnb_attr("bitsandbytes.nn.modules", "Params4bit")


def linear4bit_type():
    """``bitsandbytes.nn.Linear4bit``, or None when bitsandbytes is not imported."""
    return _bnb_attr("bitsandbytes.nn.modules", "Linear4bit")


def is_params_4bit(value) -> bool:
    """True for a bitsandbytes ``Params4bit`` (quantized or not) and for a ``Weight4bit``."""
    if isinstance(value, Weight4bit):
        return True
    kind = params4bit_type()
    return kind is not None and isinstance(value, kind)


def is_8bit(value) -> bool:
    """True for a bitsandbytes 8-bit weight (``Int8Params``)."""
    kind = _bnb_attr("bitsandbytes.nn.modules", "Int8Params")
    return kind is not None and isinstance(value, kind)


def is_linear_4bit(module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (LinearNF4 and LinearFP4 too)."""
    kind = linear4bit_type()
    return kind is not None and isinstance(module, kind)


def plain_linear_4bit(module) -> bool:
    """A ``Linear4bit`` computing exactly bitsandbytes' ``Linear4bit.forward``: no subclass forward,
    no patched forward, no hooks."""
    kind = linear4bit_type()
    if kind is None or not isinstance(module, kind) or type(module).forward is not kind.forward:
        return False
    state = module.__dict__
    return not ("forward" in state or state["_forward_hooks"] or state["_forward_pre_hooks"])


def require_bitsandbytes():
    """The bitsandbytes module; an ImportError naming the extra to install when it is missing.

    NOTE: on CPUs with AVX512-BF16, importing bitsandbytes with Hugging Face's ``kernels``
    installed asks the Hub for a CPU kernel; the import here runs with the Hub offline, so
    fused_lora never triggers a download.
    """
    found = sys.modules.get("bitsandbytes")
    if found is not None:
        return found
    try:
        with _hub_offline():
            import bitsandbytes
    except ImportError as error:
        raise ImportError(f"fused_lora: 4-bit (QLoRA) bases need bitsandbytes ({BITSANDBYTES_PIN}); install the "
                          f"extra with `{QLORA_EXTRA}` (or `pip install {BITSANDBYTES_PIN}`)") from error
    return bitsandbytes


@contextlib.contextmanager
def _hub_offline():
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    saved_constant = getattr(constants, "HF_HUB_OFFLINE", None) if constants is not None else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant


def refuse_8bit(name: str, value) -> None:
    """A ValueError naming the type, for a bitsandbytes 8-bit weight or layer."""
    if is_8bit(value) or type(value).__name__ in ("Int8Params", "Linear8bitLt"):
        raise ValueError(f"{name}: a bitsandbytes {type(value).__name__} (8-bit, LLM.int8()) is not supported by "
                         f"fused_lora; supported bases: floating-point weights and bitsandbytes 4-bit Params4bit "
                         f"(NF4, FP4; Linear4bit)")


def weight_4bit(weight, name: str = "weight") -> Weight4bit:
    """``weight`` (a ``Params4bit`` with its quant_state, or a ``Weight4bit``) as a ``Weight4bit``.

    No copy: ``packed`` is the Params4bit's own storage viewed as uint8. A ValueError naming
    ``name`` for what cannot be read (see the module docstring).
    """
    if isinstance(weight, Weight4bit):
        return weight
    if not is_params_4bit(weight):
        refuse_8bit(name, weight)
        raise TypeError(f"{name}: expected a bitsandbytes Params4bit, got {type(weight).__name__}")
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(f"{name}: this bitsandbytes Params4bit is not quantized yet (its quant_state is None); "
                         f"bitsandbytes quantizes it when the layer is moved to a device (linear.to('cpu') or "
                         f".cuda())")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            f"{name}: bitsandbytes repacked this Params4bit for its CPU inference kernel "
            f"(quant_state.packing_format_for_cpu=True; done by Linear4bit.forward in eval mode, on an input that "
            f"needs no gradient, on CPUs with AVX512-BF16). That layout (absmax rounded to bf16, nibbles "
            f"interleaved in 32-row panels) is not the stored 4-bit weight; fused_lora reads only the stored "
            f"layout. Load the weights again, or undo it as bitsandbytes does before saving or moving a weight: "
            f"weight.data, weight.quant_state = bitsandbytes.functional._convert_weight_packed_for_cpu_inverse("
            f"weight.data, weight.quant_state); to avoid it, run the 4-bit model in train mode (or on an input that "
            f"requires grad) before putting LoRA on it")
    quant_type = state.quant_type
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: expected a 4-bit quant_type 'nf4' or 'fp4', got {quant_type!r}")
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 4-bit weight of a 2-D (out_features, in_features) matrix, "
                         f"got quant_state.shape {shape}")
    # NOTE: torch.compile cannot trace .data of a Params4bit (its __torch_function__ recurses); detach()
    # is the same bytes.
    data = weight.detach() if torch.compiler.is_compiling() else weight.data
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)  # quant_storage other than uint8: the same bytes
    numel = shape[0] * shape[1]
    blocksize = int(state.blocksize)
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"{name}: expected an even quant_state.blocksize >= 2, got {blocksize}")
    if not data.is_contiguous() or data.numel() < (numel + 1) // 2:
        raise ValueError(f"{name}: expected contiguous packed data of at least {(numel + 1) // 2} bytes for shape "
                         f"{shape}, got {data.numel()} bytes with strides {tuple(data.stride())}")
    code, absmax = state.code, state.absmax
    blocks = -(-numel // blocksize)
    if code is None or code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"{name}: expected quant_state.code of 16 float32 values, got "
                         f"{None if code is None else (code.dtype, tuple(code.shape))}")
    nested = bool(state.nested)
    if nested:
        state2 = state.state2
        expected = torch.uint8
        nested_code, nested_absmax, nested_blocksize = state2.code, state2.absmax, int(state2.blocksize)
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"{name}: expected quant_state.state2.code of 256 float32 values, got "
                             f"{nested_code.dtype} of shape {tuple(nested_code.shape)}")
        if nested_blocksize < 1 or nested_absmax.dtype != torch.float32 \
                or nested_absmax.numel() < -(-blocks // nested_blocksize):
            raise ValueError(f"{name}: quant_state.state2 does not describe {blocks} absmax values "
                             f"(blocksize {nested_blocksize}, absmax {tuple(nested_absmax.shape)} {nested_absmax.dtype})")
        offset = state.offset
    else:
        expected = torch.float32
        nested_code = nested_absmax = None
        nested_blocksize, offset = 0, 0.0
    if absmax is None or absmax.dtype != expected or absmax.numel() < blocks:
        raise ValueError(f"{name}: expected quant_state.absmax of {blocks} {expected} values, got "
                         f"{None if absmax is None else (absmax.dtype, tuple(absmax.shape))}")
    dtype = state.dtype if state.dtype in DENSE_DTYPES else torch.float32
    # NOTE: exactly (N*K+1)//2 bytes (a view): storage other than uint8 may hold padding bytes after them.
    return Weight4bit(data.reshape(-1)[:(numel + 1) // 2], shape, blocksize, quant_type, code,
                      absmax if absmax.dim() == 1 else absmax.reshape(-1), nested,
                      nested_code, nested_absmax, nested_blocksize, offset, dtype)


def as_weight_4bit(weight) -> Weight4bit | None:
    """The ``Weight4bit`` of a 4-bit weight (``Params4bit`` or ``Weight4bit``, read by ``weight_4bit``), or None
    for anything else (a dense tensor: two type tests, for the eager hot path)."""
    if type(weight) is Weight4bit:
        return weight
    if type(weight) is torch.Tensor or type(weight) is torch.nn.Parameter or not is_params_4bit(weight):
        return None
    return weight_4bit(weight)


# ---------------------------------------------------------------------------------------------
# Dequantization into the package's reused buffers
# ---------------------------------------------------------------------------------------------

_BUFFERS: dict[tuple, torch.Tensor] = {}
_BUFFERS_LOCK = threading.Lock()


def _take_buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, taken out of the pool (so a second thread that
    dequantizes at the same time gets its own)."""
    key = (device, dtype)
    with _BUFFERS_LOCK:
        buffer = _BUFFERS.pop(key, None)
    if buffer is None or buffer.numel() < numel:
        buffer = None  # NOTE: drop the small one before allocating the larger
        buffer = torch.empty(numel, dtype=dtype, device=device)
    return buffer


def _give_back(buffer: torch.Tensor) -> None:
    key = (buffer.device, buffer.dtype)
    with _BUFFERS_LOCK:
        held = _BUFFERS.get(key)
        if held is None or held.numel() < buffer.numel():
            _BUFFERS[key] = buffer


def release_buffers() -> None:
    """Free the dequantization buffers (they are allocated again on the next 4-bit call)."""
    with _BUFFERS_LOCK:
        _BUFFERS.clear()


def buffer_bytes() -> int:
    """Bytes held by the dequantization buffers now."""
    with _BUFFERS_LOCK:
        return sum(b.numel() * b.element_size() for b in _BUFFERS.values())


def _dequantize_op(backend: str):
    from .ops.backends import backend_ops

    ops = backend_ops(backend)
    op = getattr(ops, "dequantize_4bit", None)
    if op is None:  # the triton backend before its kernel exists: the torch one runs on CUDA too
        op = backend_ops("torch").dequantize_4bit
    return op


def dequantize_into(w4: Weight4bit, out: torch.Tensor, backend: str) -> torch.Tensor:
    """The dense (N, K) weight in ``out``'s dtype, as bitsandbytes defines it (module docstring)."""
    op = _dequantize_op(backend)
    if out.dtype == w4.dtype or w4.dtype == torch.float32 and out.dtype in DENSE_DTYPES:
        return op(w4, out)
    # Two roundings, as bitsandbytes' dequantize_4bit(...).to(dtype): through quant_state.dtype first
    # (fp64: the exact fp32 values, upcast).
    middle = _take_buffer(out.device, w4.dtype, w4.numel)
    try:
        op(w4, middle[:w4.numel].view(w4.shape))
        out.copy_(middle[:w4.numel].view(w4.shape))
    finally:
        _give_back(middle)
    return out


@contextlib.contextmanager
def dequantized(w4: Weight4bit, dtype: torch.dtype, backend: str):
    """The dense (N, K) weight in ``dtype``, in a reused buffer valid inside the ``with`` block only.

    NOTE: the buffer goes back to the pool on exit, and the next 4-bit call of any layer on the
    same device and dtype writes it again; on CUDA that is ordered after this call's kernels by
    the stream (all of this runs on the current stream).
    """
    buffer = _take_buffer(w4.device, dtype, w4.numel)
    try:
        yield dequantize_into(w4, buffer[:w4.numel].view(w4.shape), backend)
    finally:
        _give_back(buffer)


def lora_forward_4bit(backend: str, x2d, w4: Weight4bit, bias, lora_B, xa, scaling):
    """The backend's ``lora_forward`` on a 4-bit weight: its own 4-bit path where it has one for the call
    (the cpu backend's tiled GEMM for few rows), else dequantized into the reused buffer."""
    from .ops.backends import backend_ops

    ops = backend_ops(backend)
    tiled = getattr(ops, "lora_forward_4bit_tiled", None)
    y = tiled(x2d, w4, bias, lora_B, xa, scaling) if tiled is not None else None
    if y is None:
        with dequantized(w4, x2d.dtype, backend) as dense:
            y = ops.lora_forward(x2d, dense, bias, lora_B, xa, scaling)
    return y


def lora_backward_4bit(backend: str, dy, x2d, w4: Weight4bit, lora_A, lora_B, xa, scaling, seed, dropout_p, bits,
                       needs_dx, needs_dA, needs_dB):
    """The backend's ``lora_backward`` on a 4-bit weight (read for dx only): its own 4-bit path where it has
    one, else dequantized into the reused buffer (nothing dequantized without dx)."""
    from .ops.backends import backend_ops

    ops = backend_ops(backend)
    if not needs_dx:
        return ops.lora_backward(dy, x2d, w4.dense_stand_in(dy.dtype), lora_A, lora_B, xa, scaling, seed, dropout_p,
                                 bits, False, needs_dA, needs_dB)
    tiled = getattr(ops, "lora_backward_4bit_tiled", None)
    grads = tiled(dy, x2d, w4, lora_A, lora_B, xa, scaling, seed, dropout_p, bits, needs_dx, needs_dA,
                  needs_dB) if tiled is not None else None
    if grads is None:
        with dequantized(w4, dy.dtype, backend) as dense:
            grads = ops.lora_backward(dy, x2d, dense, lora_A, lora_B, xa, scaling, seed, dropout_p, bits, needs_dx,
                                      needs_dA, needs_dB)
    return grads


def dequantize(weight, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """A new dense (N, K) tensor of a 4-bit weight (``Params4bit`` or ``Weight4bit``), in ``dtype``
    (default: the quant_state's dtype); bit-exact against bitsandbytes' ``dequantize_4bit``."""
    from .ops.backends import backend_name_for

    w4 = weight_4bit(weight)
    name = backend_name_for(w4.device, backend)
    out = torch.empty(w4.shape, dtype=dtype or w4.dtype, device=w4.device)
    return dequantize_into(w4, out, name)
