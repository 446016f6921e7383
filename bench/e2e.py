"""End-to-end row: a small transformers LlamaForCausalLM (random init, no downloads) with
LoRA on every q/k/v/o/gate/up/down projection, fused_lora against PEFT, same r, alpha, dropout.

``base="nf4"``: the same Llama with every linear layer but the output head quantized to
bitsandbytes NF4 (``Linear4bit``, double quantization, as transformers' ``load_in_4bit`` does),
PEFT's QLoRA model over it against the same PEFT model converted with ``from_peft``."""

from __future__ import annotations

import time

import torch

from fused_lora.saved_tensors import saved_tensor_bytes

from . import timing

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (hidden, intermediate, layers, heads, vocab, batch, sequence)
SIZES = {
    "cpu": (256, 688, 2, 4, 2048, 4, 256),
    "cpu-quick": (128, 344, 1, 4, 512, 2, 128),
    "cuda": (2048, 5632, 4, 16, 32000, 4, 2048),
}


def _config(size):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, vocab, _, sequence = size
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=sequence)


def _base_model(size, dtype, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config(size)).to(device=device, dtype=dtype)


def fused_model(size, r, lora_alpha, p, dtype, device):
    import fused_lora

    model = _base_model(size, dtype, device)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGET_MODULES and isinstance(child, torch.nn.Linear):
                layer = fused_lora.FusedLoRALinear.from_linear(child, r=r, lora_alpha=lora_alpha, lora_dropout=p)
                if dtype in (torch.float16, torch.bfloat16):  # PEFT's default: fp32 adapters
                    layer.lora_A.data = layer.lora_A.data.float()
                    layer.lora_B.data = layer.lora_B.data.float()
                setattr(module, child_name, layer)
    return model.train()


def peft_model(size, r, lora_alpha, p, dtype, device, base="dense"):
    import peft

    model = _base_model(size, dtype, device) if base == "dense" else quantized_model(size, dtype, device)
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=p, target_modules=TARGET_MODULES)
    return peft.get_peft_model(model, config).train()


def quantized_model(size, dtype, device):
    """The Llama with every ``nn.Linear`` but ``lm_head`` replaced by a frozen bitsandbytes NF4 ``Linear4bit``
    (double quantization, compute dtype ``dtype``) quantized from its weights, as ``load_in_4bit`` loads it."""
    from fused_lora.quantized import require_bitsandbytes

    bnb = require_bitsandbytes()
    model = _base_model(size, dtype, device)
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not model.lm_head:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4")
                layer.weight.data = child.weight.detach().clone()
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, name, layer.to(device).requires_grad_(False))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what PEFT reads to dispatch its bnb.Linear4bit LoRA layer
    return model


def fused_peft_model(size, r, lora_alpha, p, dtype, device):
    import fused_lora

    return fused_lora.from_peft(peft_model(size, r, lora_alpha, p, dtype, device, base="nf4"))


def run(device: torch.device, size_name: str, r: int, p: float, dtype: torch.dtype, repeats: int,
        base: str = "dense"):
    """Rows: tokens/s (median, p20, p80) of fwd+bwd and memory, for fused_lora and PEFT (over a 4-bit
    Llama with ``base="nf4"``)."""
    size = SIZES[size_name]
    batch, sequence, vocab = size[5], size[6], size[4]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, sequence), generator=gen).to(device)
    if base == "nf4":
        models = {"fused_lora_nf4": fused_peft_model(size, r, 2 * r, p, dtype, device),
                  "peft_nf4": peft_model(size, r, 2 * r, p, dtype, device, base="nf4")}
        # The same adapters in both (PEFT draws lora_A at random).
        import peft as peft_package

        peft_package.set_peft_model_state_dict(models["fused_lora_nf4"],
                                               peft_package.get_peft_model_state_dict(models["peft_nf4"]))
    else:
        models = {"fused_lora": fused_model(size, r, 2 * r, p, dtype, device),
                  "peft": peft_model(size, r, 2 * r, p, dtype, device)}

    def step(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = {name: [] for name in models}
    memory = {}
    for name, model in models.items():
        step(model)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(model)
            synchronize()
            memory[name] = ("peak_bytes", torch.cuda.max_memory_allocated() - start)
        else:
            memory[name] = ("saved_bytes", saved_tensor_bytes(lambda: model(input_ids=ids, labels=ids).loss,
                                                             exclude=model.parameters()))
    for _ in range(repeats):
        for name, model in models.items():  # interleaved, as for the layer rows
            synchronize()
            begin = time.perf_counter()
            step(model)
            synchronize()
            seconds[name].append(time.perf_counter() - begin)
    tokens = batch * sequence
    fused_name = next(iter(models))
    backend = _backends_used(models[fused_name], tokens, r, p)
    rows = []
    for name in models:
        med, p20, p80 = (timing.quantile(seconds[name], q) for q in timing.QUANTILES)
        kind, value = memory[name]
        rows.append(dict(provider=name, model=f"Llama{' nf4' if base == 'nf4' else ''} h={size[0]} ffn={size[1]} "
                                              f"layers={size[2]} vocab={vocab}",
                         tokens_per_step=tokens, r=r, p=p, dtype=str(dtype).replace("torch.", ""),
                         backend=backend if name == fused_name else "",
                         weight_bytes=_frozen_bytes(models[name]),
                         tokens_per_s=tokens / med, tokens_per_s_p20=tokens / p80, tokens_per_s_p80=tokens / p20,
                         step_ms=1e3 * med, memory_kind=kind, memory_bytes=value))
    return rows


def _frozen_bytes(model) -> int:
    from .providers import frozen_bytes

    return frozen_bytes(model)


def _backends_used(model, tokens, r, p) -> str:
    """The backend (and cpu path) label of every FusedLoRALinear layer (or from_peft layer) of the model,
    deduplicated."""
    import fused_lora
    from fused_lora.integrations.peft import lora_layers
    from fused_lora.ops.backends import backend_name_for

    from .report import backend_used

    labels = []
    for module in model.modules():
        if isinstance(module, fused_lora.FusedLoRALinear):
            name = backend_name_for(module.weight.device, module.backend)
            labels.append(backend_used(name, module.in_features, module.out_features, tokens, r, p))
    if not labels:
        for _, view in lora_layers(model):
            name = backend_name_for(view.lora_A.device, None)
            labels.append(backend_used(name, view.in_features, view.out_features, tokens, r, p))
    return "+".join(dict.fromkeys(labels))


def format_rows(rows) -> str:
    weights = any(row.get("weight_bytes") is not None for row in rows)
    lines = [f"{'end-to-end fwd+bwd':<50} {'provider':<22} {'tokens/s':>10} {'p20-p80':>17} "
             + (f"{'weights MiB':>11} " if weights else "") + f"{'memory MiB':>10}"]
    for row in rows:
        name = row["provider"] + (f"[{row['backend']}]" if row.get("backend") else "")
        frozen = f"{row['weight_bytes'] / 2 ** 20:>11.2f} " if weights and row.get("weight_bytes") is not None else (
            f"{'-':>11} " if weights else "")
        lines.append(f"{row['model'] + ' r=' + str(row['r']) + ' p=' + str(row['p']):<50} {name:<22} "
                     f"{row['tokens_per_s']:>10.0f} {row['tokens_per_s_p20']:>8.0f}-{row['tokens_per_s_p80']:<8.0f} "
                     f"{frozen}{row['memory_bytes'] / 2 ** 20:>10.1f} ({row['memory_kind']})")
    return "\n".join(lines)
