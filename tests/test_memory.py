"""The compute-requirements calculator (python -m fused_lora.memory) and print_trainable_parameters."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fused_lora import apply_lora, count_parameters, print_trainable_parameters
from fused_lora.memory import (GB, GIB, KNOWN_CONFIGS, count_lora_parameters, count_model_parameters,
                               full_finetuning_memory, known_config, lora_finetuning_memory, lora_parameter_count,
                               main, model_from_config, percent_fewer, weight_bytes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bigscience/mt0-large = the MT5-large architecture (written out: no download).
MT0_LARGE = dict(model_type="mt5", d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                 num_decoder_layers=24, vocab_size=250112, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)
TINY_LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _gpt3_175b_parameters():
    """Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, d_ff 4 d_model, vocabulary 50257, context 2048."""
    d, layers = 12288, 96
    per_layer = 4 * d * d + 4 * d + 2 * 4 * d * d + 4 * d + d + 2 * 2 * d  # attention, MLP (with biases), 2 LayerNorms
    return layers * per_layer + 50257 * d + (2048 + 2) * d + 2 * d  # tied embeddings, OPT's 2 extra positions, final LN


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
    assert main(["--shape", "4096x1024", "--shape", "4096x4096", "--r", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("weights 4096x1024, 4096x4096 (in x out): 20,971,520 parameters")
    assert f"LoRA r=16: {16 * (5120 + 8192):,d} trainable parameters" in out
    assert main(["--params", "175e9", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "weights                             700.00 GB (651.93 GiB)" in out and "LoRA" not in out


def test_params_with_a_rank_says_what_is_missing(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--params", "7e9", "--r", "16"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--r: the LoRA count needs the shapes of the targeted weights" in err and "--shape INxOUT" in err
    with pytest.raises(SystemExit):
        main(["--shape", "8x8", "--target-modules", "q_proj"])
    assert "--target-modules: needs --config" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mt0_large():
    return model_from_config(dict(MT0_LARGE))


def test_mt0_large_with_r8_on_q_and_v(mt0_large, capsys):
    assert next(mt0_large.parameters()).device.type == "meta"
    assert known_config("mt0-large").items() >= MT0_LARGE.items()
    # transformers 5 ties MT5's embeddings; mt0-large's checkpoint has its own lm_head.
    assert mt0_large.lm_head.weight is not mt0_large.shared.weight
    assert count_model_parameters(mt0_large) == 1_229_581_312
    assert count_lora_parameters(mt0_large, ["q", "v"], 8) == 2_359_296
    model = apply_lora(mt0_large, ["q", "v"], r=8)
    trainable, total = count_parameters(model)
    assert (trainable, total) == (2_359_296, 1_231_940_608)  # 24 encoder + 2 * 24 decoder attention blocks
    print_trainable_parameters(model)
    assert capsys.readouterr().out == ("trainable params: 2,359,296 || all params: 1,231,940,608 || "
                                       f"trainable%: {100 * 2_359_296 / 1_231_940_608:.4f}\n")


def test_the_founding_example_prints_peft_s_line(capsys):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(model_from_config("bigscience/mt0-large"),
                                     peft.LoraConfig(r=8, target_modules=["q", "v"]))
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out.strip()
    assert expected.startswith("trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915")
    assert main(["--config", "mt0-large", "--target-modules", "q", "v", "--r", "8"]) == 0
    out = capsys.readouterr().out
    assert f"  PEFT's print_trainable_parameters(): {expected}\n" in out + "\n"
    print_trainable_parameters(apply_lora(model_from_config("mt0-large"), ["q", "v"], r=8))
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize("name,hub_name,total,targets,r,lora", [
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616, ["q_proj", "v_proj"], 8, 4_194_304),
    ("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248, ["q_proj", "v_proj"], 16, 32 * 16 * (8192 + 5120)),
    ("mistral-7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096, ["q_proj", "v_proj"], 8, 32 * 8 * (8192 + 5120)),
    # The LoRA paper's GPT-3 175B row: r=8 on W_q and W_v, 37.7M trainable parameters.
    ("gpt-3-175b", "gpt3", _gpt3_175b_parameters(), ["q_proj", "v_proj"], 8, 37_748_736),
], ids=["llama-2-7b", "llama-3-8b", "mistral-7b", "gpt-3-175b"])
def test_shipped_configs_count_the_published_parameters(name, hub_name, total, targets, r, lora):
    assert name in KNOWN_CONFIGS and hub_name.lower() in {a.lower() for a in KNOWN_CONFIGS[name] + (name,)}
    model = model_from_config(hub_name)
    assert next(model.parameters()).device.type == "meta"
    assert count_model_parameters(model) == total
    assert count_lora_parameters(model, targets, r) == lora


def test_every_shipped_config_file_is_a_known_name():
    files = sorted(f[:-len(".json")] for f in os.listdir(os.path.join(ROOT, "fused_lora", "memory", "configs")))
    assert files == sorted(KNOWN_CONFIGS)
    for name in KNOWN_CONFIGS:
        assert known_config(name)["model_type"] and known_config(name.upper()) == known_config(name)


def test_no_match_names_the_linear_layers(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--target-modules", "query"])
    err = capsys.readouterr().err
    assert ("target_modules: ['query'] matched no module of the model; its linear layers are named: "
            "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj") in err
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--target-modules", "embed_tokens"])
    assert "module 'model.embed_tokens' is a Embedding, not a linear layer" in capsys.readouterr().err


def _run(code, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=environment)


def test_params_shape_and_help_import_neither_torch_nor_transformers():
    result = _run(
        "import sys\n"
        "from fused_lora.memory import main\n"
        "main(['--params', '7e9']); main(['--shape', '4096x1024', '--r', '16'])\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules\n"
        "print('no heavy imports')\n")
    assert result.returncode == 0 and "no heavy imports" in result.stdout, result.stderr
    assert "usage: fused-lora-memory" in result.stdout


def test_missing_transformers_is_one_line():
    result = _run("import sys; sys.modules['transformers'] = None\n"
                  "from fused_lora.memory import main\n"
                  "main(['--config', 'mt0-large'])\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == ("fused-lora-memory: --config needs the transformers package (pip install transformers); "
                             "--params and --shape work without it\n")


def test_config_file_and_hub_name_offline(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MT0_LARGE))
    assert main(["--config", str(path), "--target-modules", "q", "v", "--r", "8", "--dtype", "bf16"]) == 0
    from_file = capsys.readouterr().out
    assert "LoRA r=8: 2,359,296 trainable parameters" in from_file

    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub (or its cache) was consulted for a shipped config")

    monkeypatch.setattr(transformers.PretrainedConfig, "get_config_dict", no_hub)
    assert main(["--config", "bigscience/mt0-large", "--target-modules", "q", "v", "--r", "8", "--dtype", "bf16"]) == 0
    from_name = capsys.readouterr().out
    assert from_name.startswith("bigscience/mt0-large (MT5ForConditionalGeneration), LoRA on q v: "
                                "1,229,581,312 parameters")
    assert from_name.split("\n")[1:] == from_file.split("\n")[1:]  # all but the name line


def test_all_linear_on_the_command_line_is_peft_all_linear(capsys):
    # One word on the command line, as PEFT's target_modules="all-linear": every linear layer but
    # lm_head. Llama-3-8B at r=16: 32 layers x 16 x (2 x 8192 + 2 x 5120 + 3 x 18432) = 41,943,040.
    assert main(["--config", "llama-3-8b", "--target-modules", "all-linear", "--r", "16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=16: 41,943,040 trainable parameters" in out, out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fused_lora.memory", "--params", "7e9", "--dtype", "bf16"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: 7,000,000,000 parameters, weights in bf16")
    assert "fp32 master weights                 28.00 GB (26.08 GiB)" in result.stdout


def test_bad_arguments(capsys):
    with pytest.raises(ValueError, match="dtype"):
        weight_bytes(10, "fp8")
    with pytest.raises(ValueError, match="num_params"):
        weight_bytes(-1)
    with pytest.raises(ValueError, match="r: expected an int >= 1"):
        lora_parameter_count(10, 10, 0)
    with pytest.raises(ValueError, match="config: 'no-such-model' is neither"):
        model_from_config("no-such-model")
    with pytest.raises(TypeError, match="config: expected"):
        model_from_config(3)
    with pytest.raises(SystemExit):
        main(["--shape", "100by100"])
    assert "--shape: expected INxOUT (in_features x out_features)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--params", "7e9", "--shape", "10x10"])


# ---------------------------------------------------------------------------------------------
# 4-bit (bitsandbytes NF4) weights
# ---------------------------------------------------------------------------------------------

def test_nf4_counts_bitsandbytes_storage_and_no_full_finetuning(capsys):
    from fused_lora.memory import NF4_BYTES_PER_PARAMETER

    assert NF4_BYTES_PER_PARAMETER == 0.5 + 1 / 64 + 4 / 16384  # packed nibbles, uint8 absmax, fp32 per 256
    assert weight_bytes(7 * 10 ** 9, "nf4") == 7 * 10 ** 9 * (0.5 + 1 / 64 + 4 / 16384)  # 3.611e9 bytes
    with pytest.raises(ValueError, match="full fine-tuning of a nf4 model is not possible"):
        full_finetuning_memory(10 ** 9, "nf4")
    assert main(["--params", "7e9", "--dtype", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "weights                             3.61 GB (3.36 GiB)" in out
    assert "full fine-tuning: not possible" in out
    assert "  gradients" not in out and "Adam states" not in out  # no int4 "gradients" rows


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (96, 200), (33, 7)])
def test_bnb_4bit_bytes_are_what_bitsandbytes_stores(shape, double_quant):
    functional = pytest.importorskip("bitsandbytes.functional")
    from fused_lora.memory import bnb_4bit_bytes

    out_features, in_features = shape
    packed, state = functional.quantize_4bit(torch.randn(out_features, in_features), blocksize=64,
                                             compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert bnb_4bit_bytes(in_features, out_features, double_quant=double_quant) == stored


def test_config_nf4_quantizes_the_linear_layers_and_keeps_the_rest_in_its_dtype(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from fused_lora.memory import quantized_4bit_bytes

    from tiny_models import TINY_LLAMA_4BIT, tiny_llama_4bit

    real = tiny_llama_4bit(0)  # transformers' load_in_4bit layout: every Linear but lm_head in NF4, the rest fp32
    stored = 0
    for param in real.parameters():
        stored += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            stored += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax,
                                                                  state.state2.code, state.offset))
    values = dict(TINY_LLAMA, **TINY_LLAMA_4BIT)
    counted, quantized = quantized_4bit_bytes(model_from_config(dict(values)), "fp32")
    assert counted == stored
    assert quantized == sum(m.weight.numel() * 2 for m in real.modules() if type(m).__name__ == "Linear4bit")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert main(["--config", str(path), "--dtype", "nf4", "--unquantized-dtype", "fp32", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert f"weights in nf4 for {quantized:,d} (the linear layers but the output head), fp32 for the other" in out
    assert "full fine-tuning: not possible" in out and "LoRA r=4" in out
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--dtype", "bf16", "--unquantized-dtype", "fp32"])
    assert "--unquantized-dtype: needs --config and --dtype nf4 or fp4" in capsys.readouterr().err
