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


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.0", False)])
def test_triton_interpreter_refused_where_triton_and_numpy_cannot_run_it(monkeypatch, triton_version, numpy_version,
                                                                         broken):
    # Triton 3.6's interpreter indexes with int(one-element array), which NumPy 2.4 refuses: before, every
    # kernel failed inside the interpreter with "only 0-dimensional arrays can be converted to Python scalars".
    import numpy
    import triton

    from fused_lora.ops import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    backends.triton_interpreter_problem.cache_clear()
    try:
        problem = backends.triton_interpreter_problem()
        if not broken:
            assert problem is None and backend_name_for(torch.device("cpu"), "triton") == "triton"
            assert "triton" in fused_lora.available_backends()
            return
        assert f"Triton {triton_version}" in problem and "install triton>=3.7 or numpy<2.4" in problem
        with pytest.raises(ValueError, match=r"backend 'triton' cannot run on device cpu: Triton 3\.6\.0's "
                                             r"interpreter cannot run with NumPy 2\.4\.6"):
            backend_name_for(torch.device("cpu"), "triton")
        with pytest.raises(ValueError, match="numpy<2.4"):
            fused_lora.fused_lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),
                                         torch.randn(3, 1), 1.0, backend="triton")
        if not torch.cuda.is_available():
            assert "triton" not in fused_lora.available_backends()
    finally:
        monkeypatch.undo()
        backends.triton_interpreter_problem.cache_clear()


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
