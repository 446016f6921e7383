"""The backend operations (launchers) one by one, against eager PyTorch on the same inputs."""

import pytest
import torch

from fused_lora.backends import backend_ops
from fused_lora.philox import keep_mask_torch

from conftest import DEVICE_BACKENDS, assert_close, make_inputs

SHAPES = [(1, 1, 1, 1), (70, 37, 45, 3), (150, 64, 20, 16), (129, 200, 70, 64)]


def _dropped(x, seed, p):
    if p == 0.0:
        return x
    return x * keep_mask_torch(seed, *x.shape, p).to(x.device) / (1 - p)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("T,K,N,r", SHAPES)
def test_operations_against_eager(device_backend, T, K, N, r, p):
    device, backend = device_backend
    ops = backend_ops(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, torch.float64, device)
    seed, scaling = 2 ** 40 + 17, 0.5
    dy = torch.randn(T, N, dtype=torch.float64, device=device)

    xa = ops.lora_shrink(x, lora_A, seed, p)
    assert xa.shape == (T, r) and xa.dtype == torch.float64
    assert_close("xa", xa, _dropped(x, seed, p) @ lora_A.T, atol=1e-12, rtol=1e-12)

    y = ops.lora_forward(x, weight, bias, lora_B, xa, scaling)
    assert_close("y", y, x @ weight.T + bias + scaling * xa @ lora_B.T, atol=1e-12, rtol=1e-12)

    dxa = dy @ lora_B
    expected = {
        "dx": dy @ weight + scaling * _dropped(dxa @ lora_A, seed, p),
        "dA": scaling * dxa.T @ _dropped(x, seed, p),
        "dB": scaling * dy.T @ xa,
    }
    for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        results = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, seed, p, *needs)
        for name, wanted, got in zip(("dx", "dA", "dB"), needs, results):
            if wanted:
                assert_close(name, got, expected[name], atol=1e-11, rtol=1e-11)
            else:
                assert got is None, f"{name} computed although not requested"


def test_reductions_are_deterministic(device_backend):
    device, backend = device_backend
    ops = backend_ops(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(300, 64, 40, 8, torch.float32, device)
    xa = ops.lora_shrink(x, lora_A, 5, 0.1)
    dy = torch.randn(300, 40, device=device)
    first = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 1.0, 5, 0.1, True, True, True)
    again = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 1.0, 5, 0.1, True, True, True)
    for name, a, b in zip(("dx", "dA", "dB"), first, again):
        assert torch.equal(a, b), f"{name} is not bit-identical run to run"


def test_single_config_launch_without_the_autotuner(monkeypatch):
    # FUSED_LORA_AUTOTUNE=0 on a GPU launches the plain jit function with the smallest
    # fitting config; run that path here in the interpreter.
    from fused_lora.kernels import common

    device = next(d for d, b in DEVICE_BACKENDS if b == "triton")
    if device.type != "cpu":
        pytest.skip("checked on CPU under the interpreter; a GPU run takes this path for real")
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "0")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(common, "shared_memory_limit", lambda device: 232448)
    ops = backend_ops("triton")
    x, weight, bias, lora_A, lora_B = make_inputs(70, 40, 36, 3, torch.float64, device)
    xa = ops.lora_shrink(x, lora_A, 9, 0.2)
    y = ops.lora_forward(x, weight, bias, lora_B, xa, 0.5)
    assert_close("y", y, x @ weight.T + bias + 0.5 * xa @ lora_B.T, atol=1e-12, rtol=1e-12)
    dy = torch.randn(70, 36, dtype=torch.float64)
    dx, _, _ = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 0.5, 9, 0.2, True, False, False)
    expected = dy @ weight + 0.5 * _dropped((dy @ lora_B) @ lora_A, 9, 0.2)
    assert_close("dx", dx, expected, atol=1e-11, rtol=1e-11)
