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
