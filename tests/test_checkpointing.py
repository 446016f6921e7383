"""Activation checkpointing of a transformers Llama with LoRA: same gradients, dropout included."""

import warnings

import pytest
import torch
import torch.utils.checkpoint

from fused_lora import FusedLoRALinear, apply_lora

from tiny_models import reduction_length, tiny_llama, token_batch
from tolerances import assert_close_scaled


def _model(backend):
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8,
                       lora_dropout=0.2)
    torch.manual_seed(5)
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = backend
            torch.nn.init.normal_(module.lora_B, std=0.1)
    return model.train()


def _grads(model, ids):
    model.zero_grad()
    torch.manual_seed(123)  # the dropout seeds are drawn from here
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(device_backend, use_reentrant):
    device, backend = device_backend
    model = _model(backend).to(device)
    ids = token_batch(batch=2, length=8).to(device)
    loss, expected = _grads(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if use_reentrant:
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    assert model.model.gradient_checkpointing
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    loss_ckpt, actual = _grads(model, ids)
    assert len(calls) == 2, "the layer was not recomputed: checkpointing is not active"
    assert torch.equal(loss_ckpt, loss)
    assert sorted(actual) == sorted(expected) and len(actual) == 16
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        assert_close_scaled(name, actual[name], expected[name], reduction_length(tokens=16))
    # Another RNG state gives other masks: dropout is really active in both runs.
    torch.manual_seed(7)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.lora_A.grad,
                              expected["model.layers.0.self_attn.q_proj.lora_A"])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_of_a_stack_of_layers(use_reentrant):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(FusedLoRALinear(16, 24, r=4, lora_dropout=0.3), torch.nn.GELU(),
                                 FusedLoRALinear(24, 16, r=2, lora_dropout=0.3))
    for layer in (layers[0], layers[2]):
        layer.backend = "torch"
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, 16, requires_grad=True)

    def grads(checkpointed):
        layers.zero_grad()
        x.grad = None
        torch.manual_seed(9)
        y = (torch.utils.checkpoint.checkpoint(layers, x, use_reentrant=use_reentrant)
             if checkpointed else layers(x))
        y.square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layers.parameters() if p.requires_grad]

    for i, (a, e) in enumerate(zip(grads(True), grads(False))):
        assert torch.equal(a, e), f"gradient {i} differs under checkpointing"
