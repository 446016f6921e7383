"""save_adapter / load_adapter: PEFT's on-disk format, both ways, against the real PEFT package."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fused_lora import FusedLoRALinear, apply_lora, from_peft, load_adapter, save_adapter

from tiny_models import reduction_length, tiny_llama, token_batch
from tolerances import assert_close_scaled

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _randomise_adapters(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def _ours(**kwargs):
    model = apply_lora(tiny_llama(), TARGETS, **kwargs)
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = "torch"
    return _randomise_adapters(model).eval()


def _logits(model):
    with torch.no_grad():
        return model(token_batch()).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_directory_loads_in_peft_with_the_same_outputs(tmp_path, use_rslora):
    ours = _ours(r=4, lora_alpha=16, lora_dropout=0.05, use_rslora=use_rslora)
    save_adapter(ours, tmp_path, task_type="CAUSAL_LM")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
                                   "target_modules", "task_type")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": use_rslora,
        "bias": "none", "target_modules": sorted(TARGETS), "task_type": "CAUSAL_LM"}
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys and len(keys) == 12

    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    assert peft_model.peft_config["default"].use_rslora == use_rslora
    assert_close_scaled("logits", _logits(peft_model), _logits(ours), reduction_length())
    assert not torch.allclose(_logits(peft_model), _logits(tiny_llama()), atol=1e-3)  # the adapter matters


def _peft_saved(tmp_path, **config):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                     **config))
    _randomise_adapters(peft_model).eval()
    peft_model.save_pretrained(str(tmp_path))
    return peft_model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_directory_loads_into_a_plain_model(tmp_path, use_rslora):
    peft_model = _peft_saved(tmp_path, lora_dropout=0.1, use_rslora=use_rslora)
    model = tiny_llama()
    assert load_adapter(model, tmp_path) is model
    layers = [m for m in model.modules() if isinstance(m, FusedLoRALinear)]
    assert len(layers) == 6 and all(m.lora_dropout == 0.1 and m.use_rslora == use_rslora for m in layers)
    for m in layers:
        m.backend = "torch"
    assert_close_scaled("logits", _logits(model.eval()), _logits(peft_model), reduction_length())


def test_peft_directory_loads_into_a_model_with_lora_layers(tmp_path):
    peft_model = _peft_saved(tmp_path)
    model = apply_lora(tiny_llama(), TARGETS, r=4, lora_alpha=8)
    load_adapter(model, tmp_path)
    assert_close_scaled("logits", _logits(model.eval()), _logits(peft_model), reduction_length())


def test_round_trip_and_from_peft_model_saves_peft_keys(tmp_path):
    ours = _ours(r=2, lora_alpha=4)
    save_adapter(ours, tmp_path / "ours")
    again = load_adapter(tiny_llama(), tmp_path / "ours")
    assert_close_scaled("logits", _logits(again.eval()), _logits(ours), reduction_length())

    peft_model = _peft_saved(tmp_path / "peft")
    converted = from_peft(copy.deepcopy(peft_model))
    save_adapter(converted, tmp_path / "converted")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def test_target_modules_are_full_names_when_suffixes_would_catch_more(tmp_path):
    model = apply_lora(tiny_llama(), ["model.layers.0.self_attn.q_proj"], r=2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    from peft.tuners.lora import LoraLayer
    assert sum(isinstance(m, LoraLayer) for m in peft_model.modules()) == 1


def test_key_and_shape_mismatches_name_the_key(tmp_path):
    ours = _ours(r=4, lora_alpha=8)
    save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"

    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, path)
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        load_adapter(_ours(r=4, lora_alpha=8), tmp_path)

    save_file(dict(tensors, **{key: torch.zeros(4, 31)}), path)
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(4, 31\).*expects \(4, 32\)"):
        load_adapter(_ours(r=4, lora_alpha=8), tmp_path)

    extra = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    save_file(dict(tensors, **{extra: torch.zeros(4, 32)}), path)
    with pytest.raises(ValueError, match=f"unexpected key '{extra}'"):
        load_adapter(_ours(r=4, lora_alpha=8), tmp_path)

    save_file(tensors, path)
    with pytest.raises(ValueError, match="r=2 but adapter_config.json has r=4"):
        load_adapter(_ours(r=2, lora_alpha=8), tmp_path)
    with pytest.raises(ValueError, match="scaling"):
        load_adapter(_ours(r=4, lora_alpha=16), tmp_path)


@pytest.mark.parametrize("field,value", [("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True),
                                         ("bias", "all"), ("rank_pattern", {"q_proj": 8}),
                                         ("peft_type", "IA3")])
def test_unsupported_configs_are_refused(tmp_path, field, value):
    save_adapter(_ours(r=4, lora_alpha=8), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        load_adapter(tiny_llama(), tmp_path)


def test_save_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="no FusedLoRALinear"):
        save_adapter(tiny_llama(), tmp_path)
    with pytest.raises(TypeError, match="directory"):
        save_adapter(_ours(), 3)
    mixed = apply_lora(tiny_llama(), ["q_proj"], r=4)
    mixed.model.layers[1].self_attn.q_proj = FusedLoRALinear.from_linear(nn.Linear(32, 32), r=2)
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.self_attn.q_proj' has r=2"):
        save_adapter(mixed, tmp_path)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
