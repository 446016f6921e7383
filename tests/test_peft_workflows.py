"""Every PEFT workflow after ``from_peft``, on real PEFT objects, against an unconverted twin.

Each test runs the same steps on a converted model and on a deep copy that stays plain
PEFT, and compares what comes out: outputs, gradients, files, parameter counts. The
``fused_calls`` fixture shows which calls took the fused path.
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from fused_lora import from_peft

from tiny_models import randomise_parameters, reduction_length, tiny_llama, token_batch
from tolerances import assert_close_scaled

peft = pytest.importorskip("peft")
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 6  # 2 decoder layers x 3 targets

# tolerances.py's n: the tiny Llama's deepest chain of sums; gradients also sum over the batch.
N_LOGITS = reduction_length()
N_GRADS = reduction_length(tokens=token_batch().numel())


@pytest.fixture
def fused_calls(monkeypatch):
    """The adapters (lora_A tensors) of every fused_lora_linear call made by a converted PEFT module."""
    import fused_lora.integrations.peft as interop

    calls = []
    original = interop.fused_lora_linear

    def recording(x, weight, bias, lora_A, *args, **kwargs):
        calls.append(lora_A)
        return original(x, weight, bias, lora_A, *args, **kwargs)

    monkeypatch.setattr(interop, "fused_lora_linear", recording)
    return calls


def _randomise_lora_B(model, seed=3):
    return randomise_parameters(model, "lora_B", seed)


def _twins(**config):
    """(converted, plain PEFT) with equal weights and adapters."""
    plain = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **config))
    _randomise_lora_B(plain)
    converted = from_peft(copy.deepcopy(plain), backend="torch")
    return converted, plain


def _logits(model, ids=None):
    with torch.no_grad():
        return model(token_batch() if ids is None else ids).logits


def _loss(model, ids):
    logits = model(ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _grads(model, ids):
    model.zero_grad()
    _loss(model, ids).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def _assert_same_grads(ours, theirs):
    assert sorted(ours) == sorted(theirs) and ours
    for name in theirs:
        assert_close_scaled(f"grad {name}", ours[name], theirs[name], N_GRADS)


def _train_step(model, ids, lr=0.5):
    loss = _loss(model, ids)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param -= lr * param.grad


def test_save_pretrained_round_trip(tmp_path, fused_calls):
    converted, plain = _twins()
    ids = token_batch()
    _train_step(converted, ids)
    _train_step(plain, ids)
    assert len(fused_calls) == LAYERS
    converted.save_pretrained(str(tmp_path / "converted"))
    plain.save_pretrained(str(tmp_path / "plain"))

    saved = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert len(saved) == 2 * LAYERS and os.path.getsize(tmp_path / "converted" / "adapter_model.safetensors") > 1000
    for name, param in converted.named_parameters():
        if param.requires_grad:
            key = name.replace(".default", "")
            assert torch.equal(saved[key], param.detach()), key  # the trained adapter, exactly
    reference = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(reference)
    for key in saved:
        assert_close_scaled(key, saved[key], reference[key], N_GRADS)

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "converted"))
    assert_close_scaled("logits", _logits(loaded), _logits(converted), N_LOGITS)
    fused_calls.clear()
    from_peft(loaded)
    assert_close_scaled("logits", _logits(loaded), _logits(converted), N_LOGITS)
    assert len(fused_calls) == 2 * LAYERS


def test_merge_and_unload_and_unload():
    converted, plain = _twins()
    adapted = _logits(plain)
    merged = copy.deepcopy(converted).merge_and_unload()
    assert not any(isinstance(m, PeftLoraLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close_scaled("merged logits", _logits(merged), adapted, N_LOGITS)

    base = converted.unload()
    assert type(base.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(_logits(base), _logits(tiny_llama())), "unloaded logits"
    assert not torch.allclose(adapted, _logits(base), atol=1e-3)  # the adapter mattered


def test_disable_adapter_context(fused_calls):
    converted, plain = _twins()
    with converted.disable_adapter():
        assert torch.equal(_logits(converted), _logits(tiny_llama())), "disabled"
        q_proj = converted.base_model.model.model.layers[0].self_attn.q_proj
        assert q_proj.fused_adapter(torch.randn(2, 32)) == (None, "its adapters are disabled")
    assert fused_calls == []
    assert_close_scaled("enabled again", _logits(converted), _logits(plain), N_LOGITS)
    assert len(fused_calls) == LAYERS


def test_set_adapter_and_a_second_adapter_added_after_conversion(fused_calls):
    converted, plain = _twins()
    second = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"])
    for model in (converted, plain):
        torch.manual_seed(11)
        model.add_adapter("second", second)
        _randomise_lora_B(model, seed=5)
        model.set_adapter("second")
    assert converted.active_adapters == ["second"]
    q_proj = converted.base_model.model.model.layers[0].self_attn.q_proj
    o_proj = converted.base_model.model.model.layers[0].self_attn.o_proj
    # q_proj (converted) carries both adapters; o_proj is new, PEFT's own class until converted.
    assert sorted(q_proj.lora_A) == ["default", "second"] and type(o_proj) is PeftLoraLinear
    ids = token_batch()
    assert_close_scaled("logits", _logits(converted), _logits(plain), N_LOGITS)
    assert {id(a) for a in fused_calls} == {id(m.lora_A["second"].weight) for m in converted.modules()
                                             if type(m).__name__ == "FusedPeftLinear" and "second" in m.lora_A}
    _assert_same_grads(_grads(converted, ids), _grads(plain, ids))

    fused_calls.clear()
    from_peft(converted, backend="torch")  # converts the new o_proj layers too
    assert type(o_proj).__name__ == "FusedPeftLinear"
    assert_close_scaled("logits", _logits(converted), _logits(plain), N_LOGITS)
    assert len(fused_calls) == 4  # q_proj and o_proj in 2 layers carry "second"

    fused_calls.clear()
    for model in (converted, plain):
        model.set_adapter("default")
    assert_close_scaled("back to default", _logits(converted), _logits(plain), N_LOGITS)
    assert len(fused_calls) == LAYERS


def test_parameter_counts_match_peft(capsys):
    converted, plain = _twins()
    assert converted.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    trainable, total = plain.get_nb_trainable_parameters()
    assert trainable == 2 * 4 * ((32 + 32) + (32 + 16) + (48 + 32))  # q, v, down in 2 layers at r=4
    plain.print_trainable_parameters()
    expected = capsys.readouterr().out
    converted.print_trainable_parameters()
    assert capsys.readouterr().out == expected and expected.startswith(f"trainable params: {trainable:,d} ")


def _two_active(model):
    torch.manual_seed(13)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=TARGETS))
    _randomise_lora_B(model, seed=9)
    model.base_model.set_adapter(["default", "other"])


def _merged(model):
    model.merge_adapter()


def _trainable_base(model):
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)


def _dora_active(model):
    torch.manual_seed(17)
    model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
    _randomise_lora_B(model, seed=19)
    model.set_adapter("dora")


def _fp64_adapters(model):
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLinear):
            module.lora_A["default"].to(torch.float64)
            module.lora_B["default"].to(torch.float64)


@pytest.mark.parametrize("change,reason", [
    (_two_active, "it has 2 active adapters ['default', 'other']"),
    (_merged, "its adapters ['default'] are merged into the base weight"),
    (_trainable_base, "its base layer is trainable (fused_lora computes no gradient for it)"),
    (_dora_active, "adapter 'dora' uses the LoRA variant DoraLinearVariant"),
    (_fp64_adapters, "adapters in torch.float64 with an input in torch.float32 (fused: x's dtype, "
                     "or fp32 for fp16/bf16)"),
], ids=["two-active-adapters", "merged", "trainable-base", "dora", "fp64-adapters"])
def test_peft_s_own_forward_where_the_fused_op_would_differ(change, reason, fused_calls):
    converted, plain = _twins()
    change(converted)
    change(plain)
    q_proj = converted.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.fused_adapter(torch.randn(2, 32)) == (None, reason)
    ids = token_batch()
    calls_before = len(fused_calls)
    assert_close_scaled("logits", _logits(converted), _logits(plain), N_LOGITS)
    # Under no_grad a trainable base needs no gradient: the fused op is exact there.
    assert len(fused_calls) - calls_before == (LAYERS if change is _trainable_base else 0)
    if change is not _merged:  # merged: nothing depends on the adapters until unmerge_adapter()
        calls_before = len(fused_calls)
        _assert_same_grads(_grads(converted, ids), _grads(plain, ids))
        assert len(fused_calls) - calls_before == (LAYERS - 1 if change is _trainable_base else 0)


def test_mixed_batch_adapter_names_use_peft_s_forward(fused_calls):
    converted, plain = _twins()
    for model in (converted, plain):
        torch.manual_seed(23)
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=TARGETS))
        _randomise_lora_B(model, seed=29)
        model.eval()  # PEFT takes adapter_names in eval mode only
    ids = token_batch()
    names = ["default", "other"]
    with torch.no_grad():
        ours = converted(ids, adapter_names=names).logits
        theirs = plain(ids, adapter_names=names).logits
    assert_close_scaled("logits", ours, theirs, N_LOGITS)
    assert fused_calls == []


def test_global_forward_hooks_see_peft_s_calls(fused_calls):
    converted, plain = _twins()
    seen = []

    def hook(module, inputs, output):
        seen.append(type(module).__name__.replace("FusedPeftLinear", "Linear"))  # PEFT's class is also "Linear"
        return output * 1.5 if isinstance(module, nn.Linear) and output.shape[-1] == 4 else output  # edits lora_A

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        ours = _logits(converted)
        ours_seen, seen[:] = list(seen), []
        theirs = _logits(plain)
    finally:
        handle.remove()
    assert fused_calls == []
    assert ours_seen == seen and seen.count("Linear") > LAYERS
    assert_close_scaled("logits", ours, theirs, N_LOGITS)


def _backward_hook_calls(model, register):
    """The module classes whose backward hooks ran in one fwd+bwd of ``model``, hooks put by ``register``."""
    seen = []

    def hook(module, *args):
        seen.append(type(module).__name__.replace("FusedPeftLinear", "Linear"))

    handles = register(model, hook)
    try:
        _loss(model, token_batch()).backward()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "global"])
def test_backward_hooks_see_peft_s_calls(fused_calls, where):
    # Before: the fused path skipped the calls of base_layer, lora_A and lora_B, so their backward hooks (and a
    # global backward hook's calls on them) never ran on a converted model, silently.
    def register(model, hook):
        if where == "global":
            return [nn.modules.module.register_module_full_backward_hook(hook)]
        layer = model.base_model.model.model.layers[1].self_attn.q_proj  # its input needs a gradient
        child = layer.base_layer if where == "base_layer" else layer.lora_A["default"]
        return [child.register_full_backward_hook(hook)]

    converted, plain = _twins()
    ours = _backward_hook_calls(converted, register)
    theirs = _backward_hook_calls(plain, register)
    assert ours == theirs and theirs
    if where == "global":
        assert fused_calls == []
    else:
        assert len(fused_calls) == LAYERS - 1  # the other layers stay fused


def test_adapters_on_disk_from_a_converted_model(tmp_path):
    from fused_lora import load_adapter, save_adapter

    converted, plain = _twins()
    save_adapter(converted, tmp_path / "saved", task_type="CAUSAL_LM")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved"))
    assert_close_scaled("logits", _logits(reloaded), _logits(plain), N_LOGITS)

    target = from_peft(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                                         target_modules=TARGETS)))
    load_adapter(target, tmp_path / "saved")  # into the PEFT modules' own parameters
    assert_close_scaled("logits", _logits(target), _logits(plain), N_LOGITS)
    q_proj = target.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.lora_dropout["default"]) is nn.Identity  # the file's lora_dropout, 0.0
