"""Backend selection: automatic choice, the environment override, errors for what cannot run."""

import pytest
import torch

import fused_lora
from fused_lora.ops.backends import ENV_VAR, backend_name_for

from tolerances import assert_close_scaled


def test_torch_is_always_available_and_triton_here():
    names = fused_lora.available_backends()
    assert names[-1] == "torch"
    assert "triton" in names  # the interpreter on CPU, or CUDA


def test_automatic_choice_on_cpu():
    expected = "cpu" if "cpu" in fused_lora.available_backends() else "torch"
    assert backend_name_for(torch.device("cpu")) == expected


def test_environment_variable_overrides_automatic_choice(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert backend_name_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert backend_name_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        backend_name_for(torch.device("cpu"))
    # An explicit argument wins over the environment.
    assert backend_name_for(torch.device("cpu"), "torch") == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        backend_name_for(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="triton"):
        fused_lora.fused_lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),
                                     torch.randn(3, 1), 1.0, backend="triton")


def test_cpu_backend_request_fails_clearly_when_not_built():
    if "cpu" in fused_lora.available_backends():
        assert backend_name_for(torch.device("cpu"), "cpu") == "cpu"
    else:
        with pytest.raises(ValueError, match="cpu"):
            backend_name_for(torch.device("cpu"), "cpu")


def test_backends_agree_with_each_other():
    x = torch.randn(50, 24)
    weight, lora_A, lora_B = torch.randn(16, 24), torch.randn(4, 24), torch.randn(16, 4)
    outs = {name: fused_lora.fused_lora_linear(x, weight, None, lora_A, lora_B, 0.5, 0.3, seed=42, backend=name)
            for name in fused_lora.available_backends()}
    for name, y in outs.items():
        assert_close_scaled(f"{name} y", y, outs["torch"], 24 + 4)
