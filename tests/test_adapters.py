"""save_adapter / load_adapter: PEFT's on-disk format, both ways, against the real PEFT package."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fused_lora import FusedLoRALinear, apply_lora, from_peft, load_adapter, save_adapter

from tiny_models import randomise_parameters, reduction_length, tiny_llama, token_batch
from tolerances import assert_close_scaled

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _randomise_adapters(model, seed=7):
    return randomise_parameters(model, "lora_", seed)


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


# --------------------------------------------------------------------------- all or nothing (issue 8, item 2)

def _snapshot(model):
    """Everything load_adapter could change: module objects, requires_grad flags, every value."""
    return ([(name, module) for name, module in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()],
            {name: t.detach().clone() for name, t in model.state_dict().items()})


def _assert_unchanged(model, snapshot):
    modules, flags, values = snapshot
    now = [(name, module) for name, module in model.named_modules()]
    assert [n for n, _ in now] == [n for n, _ in modules], "the module tree changed"
    assert all(a is b for (_, a), (_, b) in zip(now, modules)), "a module object was replaced"
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == flags, "requires_grad changed"
    state = model.state_dict()
    assert sorted(state) == sorted(values)
    for name, value in values.items():
        assert torch.equal(state[name], value), f"{name} changed"
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            assert module.lora_dropout == 0.0


def _write_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _write_tensors(directory, change):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

# (what is broken, how, the error message: a regex that must name the file and the field or key)
BROKEN = [
    ("missing key", lambda d: _write_tensors(d, lambda t: t.pop(KEY)),
     rf"adapter_model.safetensors: missing key '{KEY}'"),
    ("unexpected key", lambda d: _write_tensors(d, lambda t: t.update({KEY.replace("v_proj", "o_proj"): t[KEY].clone()})),
     r"adapter_model.safetensors: unexpected key '.*o_proj.lora_A.weight'"),
    ("rank mismatch", lambda d: _write_tensors(d, lambda t: t.update({KEY: t[KEY][:3]})),
     rf"adapter_model.safetensors: key '{KEY}' has shape \(3, 32\)"),
    ("integer tensor", lambda d: _write_tensors(d, lambda t: t.update({KEY: t[KEY].long()})),
     rf"adapter_model.safetensors: key '{KEY}': expected a float16.*got torch.int64"),
    ("3-D tensor", lambda d: _write_tensors(d, lambda t: t.update({KEY: t[KEY][None]})),
     rf"adapter_model.safetensors: key '{KEY}': expected a 2-D tensor"),
    ("not safetensors", lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"),
     r"adapter_model.safetensors: cannot be read"),
    ("invalid JSON", lambda d: (d / "adapter_config.json").write_text('{"r": 4,'),
     r"adapter_config.json: not valid JSON: .* at line 1"),
    ("JSON list", lambda d: (d / "adapter_config.json").write_text("[]"),
     r"adapter_config.json: expected a JSON object"),
    ("r as a string", lambda d: _write_config(d, r="4"), r"adapter_config.json: field 'r': expected an int >= 1, got '4'"),
    ("r zero", lambda d: _write_config(d, r=0), r"adapter_config.json: field 'r': expected an int >= 1, got 0"),
    ("r float", lambda d: _write_config(d, r=4.0), r"adapter_config.json: field 'r'"),
    ("r bool", lambda d: _write_config(d, r=True), r"adapter_config.json: field 'r'"),
    ("lora_dropout 1.5", lambda d: _write_config(d, lora_dropout=1.5),
     r"adapter_config.json: field 'lora_dropout': expected a number in \[0, 1\), got 1.5"),
    ("lora_dropout string", lambda d: _write_config(d, lora_dropout="0.1"), r"adapter_config.json: field 'lora_dropout'"),
    ("lora_alpha NaN", lambda d: _write_config(d, lora_alpha=float("nan")),
     r"adapter_config.json: field 'lora_alpha': expected a finite number"),
    ("lora_alpha huge", lambda d: _write_config(d, lora_alpha=1e300),
     r"adapter_config.json: fields 'lora_alpha' and 'r'.*scaling"),
    ("lora_alpha int beyond float", lambda d: _write_config(d, lora_alpha=10 ** 400),  # once an OverflowError
     r"adapter_config.json: field 'lora_alpha': expected a finite number"),
    ("use_rslora string", lambda d: _write_config(d, use_rslora="yes"), r"adapter_config.json: field 'use_rslora'"),
    ("target_modules number", lambda d: _write_config(d, target_modules=3),
     r"adapter_config.json: field 'target_modules'"),
    ("target_modules match nothing", lambda d: _write_config(d, target_modules=["nothing_here"]),
     r"adapter_config.json: field 'target_modules'.*matched no module"),
    ("no config", lambda d: (d / "adapter_config.json").unlink(), r"has no adapter_config.json"),
]


def _saved(tmp_path):
    directory = tmp_path / "adapter"
    save_adapter(_ours(r=4, lora_alpha=8), directory)
    return directory


@pytest.mark.parametrize("broken,break_it,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_failed_load_into_a_plain_model_leaves_it_unchanged(tmp_path, broken, break_it, message):
    directory = _saved(tmp_path)
    break_it(directory)
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, directory)
    _assert_unchanged(model, snapshot)
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


@pytest.mark.parametrize("broken,break_it,message",
                         [b for b in BROKEN if b[0] != "target_modules match nothing"],
                         ids=[b[0] for b in BROKEN if b[0] != "target_modules match nothing"])
def test_failed_load_into_a_model_with_lora_layers_leaves_it_unchanged(tmp_path, broken, break_it, message):
    directory = _saved(tmp_path)
    break_it(directory)
    model = _ours(r=4, lora_alpha=8)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, directory)
    _assert_unchanged(model, snapshot)


def test_failure_while_changing_the_model_is_rolled_back(tmp_path, monkeypatch):
    """An error no check foresaw (here: the third copy fails) still leaves the model as it was."""
    import fused_lora.integrations.adapters as adapters

    directory = _saved(tmp_path)
    _write_config(directory, lora_dropout=0.2)
    real_copy = torch.Tensor.copy_
    calls = []

    def failing_copy(self, source, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real_copy(self, source, *args, **kwargs)

    for model in (tiny_llama(), _ours(r=4, lora_alpha=8)):
        snapshot = _snapshot(model)
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(adapters, "_copy_values", lambda layers, values: [
                failing_copy(getattr(layers[n], p).detach(), v) for n, p, v in values])
            with pytest.raises(RuntimeError, match="simulated failure"):
                load_adapter(model, directory)
        assert len(calls) == 3
        _assert_unchanged(model, snapshot)
    # Without the failure the same directory loads.
    model = load_adapter(tiny_llama(), directory)
    assert all(m.lora_dropout == 0.2 for m in model.modules() if isinstance(m, FusedLoRALinear))


def test_valid_config_values_load(tmp_path):
    """Defaults and other valid spellings: lora_dropout null or an int, a regex target_modules."""
    directory = _saved(tmp_path)
    _write_config(directory, lora_dropout=None, target_modules=r".*\.(q_proj|v_proj|up_proj)")
    model = load_adapter(tiny_llama(), directory)
    assert sum(isinstance(m, FusedLoRALinear) and m.lora_dropout == 0.0 for m in model.modules()) == 6
    _write_config(directory, lora_dropout=0)
    assert load_adapter(_ours(r=4, lora_alpha=8), directory) is not None


def test_numpy_hyperparameters_save_as_plain_json(tmp_path):
    # A numpy lora_alpha (from a sweep or a config library) once failed in json.dump after the
    # weights file was written, leaving a truncated adapter_config.json behind.
    np = pytest.importorskip("numpy")
    model = _ours(r=np.int64(4), lora_alpha=np.float32(16), lora_dropout=np.float64(0.05))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16.0, 0.05)
    loaded = load_adapter(tiny_llama().eval(), tmp_path / "adapter")
    layer = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scaling == 4.0 and type(layer.lora_alpha) is float
    assert_close_scaled("logits", _logits(loaded), _logits(model), reduction_length())


# --------------------------------------------------------------------------- adapter dtypes

def _bf16_llama():
    return tiny_llama().to(torch.bfloat16)


def test_peft_fp32_adapters_load_into_a_bf16_model_unrounded(tmp_path):
    # Before: load_adapter rounded PEFT's fp32 adapters to bf16 (outputs 7.8e-3 off PEFT's).
    peft_model = peft.get_peft_model(_bf16_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomise_adapters(peft_model).eval()
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    peft_model.save_pretrained(str(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for model in (_bf16_llama(), apply_lora(_bf16_llama(), TARGETS, r=4, lora_alpha=8)):  # made by it, or there
        load_adapter(model, tmp_path)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
        assert len(layers) == 6
        for name, layer in layers.items():
            assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
            assert torch.equal(layer.lora_A, saved[f"base_model.model.{name}.lora_A.weight"]), name
            assert torch.equal(layer.lora_B, saved[f"base_model.model.{name}.lora_B.weight"]), name
            layer.backend = "torch"
        assert_close_scaled("logits", _logits(model.eval()).float(), _logits(peft_model).float(),
                            reduction_length(), dtype=torch.bfloat16)


def test_a_lossy_cast_is_refused_naming_the_tensor(tmp_path):
    peft_model = _peft_saved(tmp_path)  # fp32 adapters with values bf16 cannot hold
    model = apply_lora(_bf16_llama(), TARGETS, r=4, lora_alpha=8, adapter_dtype=torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: key '{key}' is torch.float32 and layer "
                                         rf"'model.layers.0.self_attn.q_proj' holds torch.bfloat16 adapters: the "
                                         rf"cast would round \d+ of its 128 values"):
        load_adapter(model, tmp_path)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    # fp32 values that bf16 holds exactly load into bf16 adapters.
    tensors = {k: v.to(torch.bfloat16).float() for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    load_adapter(model, tmp_path)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.float(), tensors[key])
    del peft_model


def test_half_precision_files_load_exactly_into_fp32_and_fp64_models(tmp_path):
    _peft_saved(tmp_path)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    for dtype in (torch.float32, torch.float64):
        model = load_adapter(tiny_llama().to(dtype), tmp_path)
        layer = model.model.layers[1].mlp.up_proj
        assert layer.lora_A.dtype == dtype
        assert torch.equal(layer.lora_B, tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].to(dtype))
    model = load_adapter(tiny_llama().to(torch.float16), tmp_path)  # bf16 values into an fp16 model: fp32 adapters
    assert model.model.layers[1].mlp.up_proj.lora_A.dtype == torch.float32
