"""Small randomly initialised models shared by the integration tests (no downloads)."""

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_dropout=0.0, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed=0, **overrides):
    """A 2-layer LlamaForCausalLM in fp32, eval mode, fixed random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


def randomise_parameters(model, name_part: str, seed: int, scale: float = 0.2):
    """Fill every parameter whose name contains ``name_part`` with scale * N(0, 1), seeded.

    LoRA's B starts at zero, so tests that compare adapters randomise it (or A and B).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name_part in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def token_batch(batch=2, length=10, vocab=96, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def reduction_length(config=None, tokens: int = 0) -> int:
    """The summed reduction lengths along a tiny Llama's deepest chain (tolerances.py's n).

    Per layer: q/k/v and o_proj over hidden_size, up over hidden_size, down over
    intermediate_size; then lm_head over hidden_size. Gradients of the weights also
    reduce over the ``tokens`` of the batch.
    """
    config = config or tiny_llama_config()
    per_layer = 3 * config.hidden_size + config.intermediate_size
    return config.num_hidden_layers * per_layer + config.hidden_size + tokens


# ---------------------------------------------------------------------------------------------
# 4-bit (bitsandbytes) bases
# ---------------------------------------------------------------------------------------------

# NOTE: in_features are multiples of 64 (bitsandbytes' blocksize): bitsandbytes 0.50.2's C++ CPU
# dequantize (which PEFT's Linear4bit runs on CPU) returns wrong values for some weights whose
# in_features is not (tests/test_quantized.py shows its PyTorch path agreeing with fused_lora there).
TINY_LLAMA_4BIT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def linear_4bit(out_features, in_features, quant_type="nf4", nested=True, dtype=torch.float32, bias=True,
                seed=0, quant_storage=torch.uint8, compute_dtype=None):
    """A frozen bitsandbytes Linear4bit on the CPU, quantized from seeded random weights of ``dtype``."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage)
    layer.weight.data = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(dtype)
    if bias:
        layer.bias = torch.nn.Parameter((torch.randn(out_features, generator=gen) * 0.1).to(dtype),
                                        requires_grad=False)
    return layer.to("cpu").requires_grad_(False)  # .to() quantizes


def tiny_llama_4bit(seed=0, dtype=torch.float32, nested=True, **overrides):
    """tiny_llama with every linear layer but lm_head quantized to NF4 as transformers' load_in_4bit does
    (a frozen Linear4bit of the same weights, compute dtype ``dtype``), in eval mode."""
    import bitsandbytes as bnb

    model = tiny_llama(seed, **{**TINY_LLAMA_4BIT, **overrides}).to(dtype)
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not model.lm_head:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=nested, quant_type="nf4")
                layer.weight.data = child.weight.detach().clone()
                setattr(module, name, layer.to("cpu").requires_grad_(False))
    model.is_loaded_in_4bit = True  # what PEFT reads to put its bnb.Linear4bit LoRA layer on them
    return model.eval()
