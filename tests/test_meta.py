"""The meta device: shapes and dtypes, no data, as models are built before they are materialised.

``torch.device("meta")``, accelerate's ``init_empty_weights`` and FSDP build models on
meta and materialise them later; a forward there must give the right shapes and dtypes.
"""

import pytest
import torch

from fused_lora import FusedLoRALinear, apply_lora, fused_lora_linear

from tiny_models import tiny_llama_config, token_batch

META = torch.device("meta")
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float64, torch.float64)])
@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, True), (0.3, False)])
def test_functional_forward_and_backward_on_meta(dtype, adapter_dtype, p, training):
    x = torch.empty(2, 5, 24, device=META, dtype=dtype, requires_grad=True)
    weight = torch.empty(12, 24, device=META, dtype=dtype)
    bias = torch.empty(12, device=META, dtype=dtype)
    lora_A = torch.empty(4, 24, device=META, dtype=adapter_dtype, requires_grad=True)
    lora_B = torch.empty(12, 4, device=META, dtype=adapter_dtype, requires_grad=True)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, p, training=training)
    assert (y.shape, y.dtype, y.device) == ((2, 5, 12), dtype, META)
    dx, dA, dB = torch.autograd.grad(y, (x, lora_A, lora_B), torch.empty_like(y))
    for grad, tensor in ((dx, x), (dA, lora_A), (dB, lora_B)):
        assert (grad.shape, grad.dtype, grad.device) == (tensor.shape, tensor.dtype, META)


def test_meta_refuses_a_backend_that_needs_data():
    x, weight = torch.empty(3, 8, device=META), torch.empty(4, 8, device=META)
    lora_A, lora_B = torch.empty(2, 8, device=META), torch.empty(4, 2, device=META)
    for backend in ("cpu", "triton"):
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run on device meta"):
            fused_lora_linear(x, weight, None, lora_A, lora_B, 1.0, backend=backend)


def test_layer_built_on_meta_runs_there_and_materialises():
    with torch.device("meta"):
        layer = FusedLoRALinear(24, 12, r=4, lora_dropout=0.1)
    assert all(p.device == META for p in layer.parameters())
    y = layer(torch.empty(7, 24, device=META))
    assert (y.shape, y.device) == ((7, 12), META)
    y.sum().backward()
    assert layer.lora_A.grad.shape == (4, 24) and layer.lora_A.grad.device == META

    layer.to_empty(device="cpu")
    layer._reset_base_parameters()
    layer.reset_lora_parameters()
    layer.eval()
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def _count_fused(model):
    return sum(isinstance(m, FusedLoRALinear) for m in model.modules())


def test_whole_transformers_model_with_apply_lora_on_meta():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
        apply_lora(model, ["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    assert _count_fused(model) == 6
    assert all(p.device == META for p in model.parameters())
    ids = token_batch(batch=2, length=6).to(META)
    model.train()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 6, 96) and out.logits.device == META
    out.loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.grad is not None and layer.lora_A.grad.device == META


def test_init_empty_weights_then_apply_lora():
    accelerate = pytest.importorskip("accelerate")
    from transformers import LlamaForCausalLM

    with accelerate.init_empty_weights():
        model = LlamaForCausalLM(tiny_llama_config())
    apply_lora(model, "all-linear", r=2)
    assert _count_fused(model) == 14
    layer = model.model.layers[1].mlp.down_proj
    assert layer.weight.device == META and layer.lora_A.device == META
    with torch.no_grad():
        logits = model(token_batch(batch=1, length=5).to(META)).logits
    assert logits.shape == (1, 5, 96) and logits.device == META
