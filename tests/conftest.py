"""Shared set-up for the suite.

TRITON_INTERPRET must be set before any @triton.jit function is defined: on
a machine without CUDA the Triton kernels run in the interpreter on CPU tensors.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("FUSED_LORA_AUTOTUNE", "0")  # on a GPU: one config per kernel, not a tuning run per shape
os.environ.pop("FUSED_LORA_BACKEND", None)  # tests choose backends explicitly
# NOTE: importing bitsandbytes on a CPU with AVX512-BF16 while Hugging Face's `kernels` is installed asks
# the Hub for a CPU kernel; the suite never touches the network (and never needs that kernel).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from fused_lora.ops.backends import _runs_on  # noqa: E402


def device_backend_pairs():
    """Every (device, backend) that can run here: CPU always, CUDA when present."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [(d, b) for d in devices for b in ("triton", "cpu", "torch") if _runs_on(b, d)]


DEVICE_BACKENDS = device_backend_pairs()
DEVICE_BACKEND_IDS = [f"{d.type}-{b}" for d, b in DEVICE_BACKENDS]


@pytest.fixture(params=DEVICE_BACKENDS, ids=DEVICE_BACKEND_IDS)
def device_backend(request):
    return request.param


def assert_close(name, actual, expected, atol, rtol):
    """torch.testing.assert_close with the tensor's name; its message shows where and by how much."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def make_inputs(T, K, N, r, dtype, device, bias=True, adapter_dtype=None, seed=0, batch_shape=None):
    """x (T, K) or batch_shape + (K,), weight, bias, lora_A, lora_B with unit-scale outputs."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    shape = tuple(batch_shape) + (K,) if batch_shape else (T, K)
    x = rand(*shape)
    weight = rand(N, K, scale=K ** -0.5)
    b = rand(N) if bias else None
    lora_A = rand(r, K, scale=K ** -0.5, dt=adapter_dtype)
    lora_B = rand(N, r, scale=r ** -0.5, dt=adapter_dtype)
    return x, weight, b, lora_A, lora_B


def run_forward_backward(fn, x, lora_A, lora_B, dy):
    """y and the gradients of x, lora_A, lora_B of ``fn(x, A, B)`` for the upstream gradient dy."""
    x = x.detach().requires_grad_(True)
    lora_A = lora_A.detach().requires_grad_(True)
    lora_B = lora_B.detach().requires_grad_(True)
    y = fn(x, lora_A, lora_B)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    return (y.detach(),) + tuple(grads)


OUTPUT_NAMES = ("y", "dx", "dA", "dB")
