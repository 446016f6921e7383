"""Environment variables: every switch parsed one way (fused_lora.env), empty means the default,
anything else is a ValueError naming the variable."""

import os
import subprocess
import sys

import pytest
import torch

import fused_lora
from fused_lora.env import FALSE_WORDS, TRUE_WORDS, env_choice, env_flag
from fused_lora.kernels import common
from fused_lora.ops import backends
from fused_lora.ops.triton_ops import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPELLINGS = [(word, True) for word in TRUE_WORDS] + [(word, False) for word in FALSE_WORDS] + [
    ("TRUE", True), ("False", False), ("Yes", True), ("NO", False), ("On", True), ("oFF", False), (" on ", True)]

# Every switch the package reads, with the function that reads it and its default.
SWITCHES = [
    ("FUSED_LORA_FORCE_TMA", launch.force_tma, False),
    ("TRITON_INTERPRET", backends.triton_interpret_mode, False),
    ("TRITON_INTERPRET", common.interpreting, False),
    ("FUSED_LORA_AUTOTUNE", launch.autotuning, True),
]
SWITCH_IDS = ["force_tma", "backends.triton_interpret_mode", "kernels.interpreting", "autotuning"]


@pytest.mark.parametrize("variable,read,default", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("word,expected", SPELLINGS, ids=[repr(w) for w, _ in SPELLINGS])
def test_every_switch_reads_every_spelling_one_way(monkeypatch, variable, read, default, word, expected):
    # Before: FUSED_LORA_AUTOTUNE=false/off/no meant on, FUSED_LORA_FORCE_TMA=true and
    # TRITON_INTERPRET=true meant off.
    monkeypatch.setenv(variable, word)
    assert read() is expected


@pytest.mark.parametrize("variable,read,default", SWITCHES, ids=SWITCH_IDS)
def test_empty_or_unset_switch_is_the_default_and_nonsense_is_an_error(monkeypatch, variable, read, default):
    monkeypatch.delenv(variable, raising=False)
    assert read() is default
    monkeypatch.setenv(variable, "")
    assert read() is default
    for nonsense in ("2", "y", "enable", "1.0"):
        monkeypatch.setenv(variable, nonsense)
        with pytest.raises(ValueError, match=f"environment variable {variable}: expected 1/true/yes/on or "
                                             f"0/false/no/off.*got '{nonsense}'"):
            read()


def test_autotune_keeps_its_compile_value(monkeypatch):
    for value in ("compile", "Compile"):
        monkeypatch.setenv("FUSED_LORA_AUTOTUNE", value)
        assert launch.compile_only() and not launch.autotuning()
    for value, tuning in (("off", False), ("no", False), ("false", False), ("0", False), ("yes", True), ("", True)):
        monkeypatch.setenv("FUSED_LORA_AUTOTUNE", value)
        assert launch.autotuning() is tuning and not launch.compile_only(), value
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "compiled")
    with pytest.raises(ValueError, match="FUSED_LORA_AUTOTUNE.* or compile"):
        launch.compile_only()


def test_triton_interpret_true_lets_the_triton_backend_run_on_cpu(monkeypatch):
    # Before: Triton interpreted with TRITON_INTERPRET=true, while fused_lora refused
    # backend="triton" on CPU with "needs TRITON_INTERPRET=1".
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert backends.backend_name_for(torch.device("cpu"), "triton") == "triton"
    assert "triton" in fused_lora.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.backend_name_for(torch.device("cpu"), "triton")


def test_backend_variable_is_a_choice_read_like_the_others(monkeypatch):
    # Before: FUSED_LORA_BACKEND was read raw, so " Torch " raised where FUSED_LORA_CPU_PATH=" ATEN " worked.
    cpu = torch.device("cpu")
    for value in ("torch", "Torch", " TORCH "):
        monkeypatch.setenv("FUSED_LORA_BACKEND", value)
        assert backends.backend_name_for(cpu) == "torch"
        assert backends.backend_name_for(cpu, "cpu") == "cpu"  # the argument wins
    monkeypatch.delenv("FUSED_LORA_BACKEND")
    automatic = backends.backend_name_for(cpu)
    monkeypatch.setenv("FUSED_LORA_BACKEND", " ")  # blank: the automatic choice, as every variable's empty value
    assert backends.backend_name_for(cpu) == automatic
    monkeypatch.setenv("FUSED_LORA_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"environment variable FUSED_LORA_BACKEND: expected one of "
                                         r"\('triton', 'cpu', 'torch'\) \(any case; empty for the default\), got 'gpu'"):
        backends.backend_name_for(cpu)


def test_skip_ext_switch_in_the_package(monkeypatch):
    # The source-checkout guard is off with FUSED_LORA_SKIP_EXT on, in every spelling.
    monkeypatch.setattr(fused_lora, "_has_extension", lambda directory: False)
    monkeypatch.setattr(fused_lora, "_installed_copy_with_extension", lambda: "/site-packages/fused_lora")
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("FUSED_LORA_SKIP_EXT", value)
        fused_lora._check_not_shadowing()
    for value in ("0", "off", ""):
        monkeypatch.setenv("FUSED_LORA_SKIP_EXT", value)
        with pytest.raises(ImportError, match="source checkout"):
            fused_lora._check_not_shadowing()
    monkeypatch.setenv("FUSED_LORA_SKIP_EXT", "skip")
    with pytest.raises(ValueError, match="FUSED_LORA_SKIP_EXT"):
        fused_lora._check_not_shadowing()


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_setup_py_reads_the_skip_switch_as_the_package_does():
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, FUSED_LORA_SKIP_EXT="true"))
    assert result.returncode == 0 and "FUSED_LORA_SKIP_EXT=true: installing without" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, FUSED_LORA_SKIP_EXT="maybe"))
    assert result.returncode != 0 and "environment variable FUSED_LORA_SKIP_EXT" in result.stderr, result.stderr


def test_empty_gpu_only_settings_do_not_break_the_cpu_package():
    # Before: FUSED_LORA_DROPOUT_MASK= (empty) raised at the first call on CPU.
    code = ("import torch, fused_lora\n"
            "from fused_lora.ops import backends\n"
            "y = fused_lora.fused_lora_linear(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 4),\n"
            "                                 torch.randn(5, 2), 1.0, 0.5, seed=3)\n"
            "print(backends.TRITON_MASK_MODE, tuple(y.shape))\n")
    result = _python(code, FUSED_LORA_DROPOUT_MASK="", FUSED_LORA_CPU_PATH="", FUSED_LORA_AUTOTUNE="",
                     FUSED_LORA_FORCE_TMA="", FUSED_LORA_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "bits (3, 5)"
    result = _python(code, FUSED_LORA_DROPOUT_MASK="Seed")
    assert result.returncode == 0 and result.stdout.split("\n")[-2] == "seed (3, 5)", result.stderr
    result = _python(code, FUSED_LORA_DROPOUT_MASK="packed")
    assert result.returncode != 0 and "environment variable FUSED_LORA_DROPOUT_MASK" in result.stderr


def test_parsers_directly(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_TEST_SWITCH", " Off ")
    assert env_flag("FUSED_LORA_TEST_SWITCH", True) is False
    monkeypatch.setenv("FUSED_LORA_TEST_SWITCH", "auto")
    assert env_flag("FUSED_LORA_TEST_SWITCH", True, extra=("auto",)) == "auto"
    monkeypatch.setenv("FUSED_LORA_TEST_CHOICE", "FUSED")
    assert env_choice("FUSED_LORA_TEST_CHOICE", ("auto", "fused"), "auto") == "fused"
    monkeypatch.setenv("FUSED_LORA_TEST_CHOICE", "")
    assert env_choice("FUSED_LORA_TEST_CHOICE", ("auto", "fused"), "auto") == "auto"
    monkeypatch.setenv("FUSED_LORA_TEST_CHOICE", "fast")
    with pytest.raises(ValueError, match=r"FUSED_LORA_TEST_CHOICE: expected one of \('auto', 'fused'\)"):
        env_choice("FUSED_LORA_TEST_CHOICE", ("auto", "fused"), "auto")
