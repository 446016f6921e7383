"""The compute-requirements calculator and print_trainable_parameters."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_lora import apply_lora, count_parameters, print_trainable_parameters
from fused_lora.memory import (GB, GIB, KNOWN_CONFIGS, full_finetuning_memory, lora_finetuning_memory,
                               lora_parameter_count, main, model_from_config, percent_fewer, weight_bytes)

# bigscience/mt0-large = the MT5-large architecture (written out: no download).
MT0_LARGE = dict(model_type="mt5", d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                 num_decoder_layers=24, vocab_size=250112, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)


def test_weights_by_dtype():
    assert weight_bytes(175 * 10 ** 9, "fp32") == 700 * GB
    assert weight_bytes(10 ** 9, "fp32") / GIB == pytest.approx(3.725, abs=5e-4)
    assert weight_bytes(10 ** 9, "bf16") == weight_bytes(10 ** 9, "fp16") == 2 * 10 ** 9
    full = full_finetuning_memory(175 * 10 ** 9, "fp32")
    assert (full.weights, full.gradients, full.optimizer_states, full.master_weights) == (
        700 * GB, 700 * GB, 1400 * GB, 0)
    half = full_finetuning_memory(10 ** 9, "bf16")
    assert half.total == (2 + 2 + 8 + 4) * 10 ** 9  # mixed precision: 16 bytes per parameter
    lora = lora_finetuning_memory(10 ** 9, 10 ** 6, "bf16")
    assert lora.weights == 2 * 10 ** 9 + 4 * 10 ** 6 and lora.total == 2 * 10 ** 9 + 16 * 10 ** 6


def test_lora_parameter_count_of_a_100x100_weight():
    assert lora_parameter_count(100, 100, 2) == 400
    assert percent_fewer(400, 100 * 100) == "96"
    layer = apply_lora(torch.nn.Sequential(torch.nn.Linear(100, 100, bias=False)), ["0"], r=2)
    assert count_parameters(layer) == (400, 10_400)


def test_command_line_shape_and_params(capsys):
    assert main(["--shape", "100x100", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=2: 400 trainable parameters against 10,000 (96% fewer)" in out
    assert main(["--params", "175e9", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "weights                             700.00 GB (651.93 GiB)" in out


@pytest.fixture(scope="module")
def mt0_large():
    return model_from_config(dict(MT0_LARGE))


def test_mt0_large_with_r8_on_q_and_v(mt0_large, capsys):
    assert next(mt0_large.parameters()).device.type == "meta"
    assert KNOWN_CONFIGS["mt0-large"].items() >= MT0_LARGE.items()
    model = apply_lora(mt0_large, ["q", "v"], r=8)
    trainable, total = count_parameters(model)
    assert trainable == 2_359_296  # 24 encoder + 2 * 24 decoder attention blocks, 2 * 8 * (1024 + 1024) each
    print_trainable_parameters(model)
    assert capsys.readouterr().out == (f"trainable params: 2,359,296 || all params: {total:,d} || "
                                       f"trainable%: {100 * 2_359_296 / total:.4f}\n")


def test_print_trainable_parameters_is_peft_s_format(capsys):
    peft = pytest.importorskip("peft")
    model = model_from_config(dict(MT0_LARGE))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q", "v"]))
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    assert expected.startswith("trainable params: 2,359,296 || all params: ")
    print_trainable_parameters(apply_lora(model_from_config("mt0-large"), ["q", "v"], r=8))
    assert capsys.readouterr().out == expected


def test_config_file_and_module_entry_point(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MT0_LARGE))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "fused_lora.memory", "--config", str(path),
                             "--target-modules", "q", "v", "--r", "8", "--dtype", "bf16"],
                            capture_output=True, text=True, timeout=120, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert "LoRA r=8: 2,359,296 trainable parameters" in result.stdout
    assert "MT5ForConditionalGeneration" in result.stdout


def test_bad_arguments(capsys):
    with pytest.raises(ValueError, match="dtype"):
        weight_bytes(10, "fp8")
    with pytest.raises(ValueError, match="num_params"):
        weight_bytes(-1)
    with pytest.raises(ValueError, match="r: expected an int >= 1"):
        lora_parameter_count(10, 10, 0)
    with pytest.raises(ValueError, match="config: 'no-such-model' is neither"):
        model_from_config("no-such-model")
    with pytest.raises(SystemExit):
        main(["--shape", "100by100"])
    assert "--shape: expected OUTxIN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--params", "7e9", "--shape", "10x10"])
