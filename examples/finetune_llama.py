"""Fine-tune a small LlamaForCausalLM with LoRA: fused_lora against PEFT, step for step.

No downloads: the model is built from a config with random weights, and the text is
the source of a few Python standard-library modules, read from disk and tokenised
byte by byte (vocabulary of 256). Each training sequence gives one next-token target
per position, as a decoder is trained (``labels=input_ids``; the model shifts them).

Both runs start from the same base weights and the same initial adapters (PEFT's
initial adapter is saved in PEFT's format and loaded with ``fused_lora.load_adapter``),
see the same batches and use the same AdamW settings. With ``--lora-dropout 0`` the
losses agree step for step. The script prints the losses, tokens/s and peak memory
(on CUDA: ``torch.cuda.max_memory_allocated``; on CPU: the bytes autograd saves for
backward in one step, the activation memory LoRA's layers change).

    python examples/finetune_llama.py --steps 20
    python examples/finetune_llama.py --device cuda --hidden-size 512 --layers 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import tempfile
import textwrap
import time

import torch

import fused_lora
from fused_lora.saved_tensors import saved_tensor_bytes

TEXT_MODULES = (textwrap, argparse, json)


def offline_text() -> bytes:
    """The source of a few standard-library modules: real text, always on disk."""
    return "\n".join(inspect.getsource(module) for module in TEXT_MODULES).encode("utf-8")


def make_batches(text: bytes, steps: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of (batch_size, seq_len) byte ids cut at random offsets."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if data.numel() <= seq_len:
        raise ValueError(f"seq_len: the text has {data.numel()} bytes, need more than {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
        batches.append(torch.stack([data[s:s + seq_len] for s in starts.tolist()]))
    return batches


def build_base_model(hidden_size: int, layers: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden_size // 32)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=max(seq_len, 64),
                         tie_word_embeddings=False, attention_dropout=0.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_pair(args):
    """(peft_model, fused_model): same base weights, same initial adapters."""
    import peft

    base = build_base_model(args.hidden_size, args.layers, args.seq_len, args.seed)
    lora_config = peft.LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                  target_modules=args.target_modules, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), lora_config)
    fused_model = base
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        fused_lora.load_adapter(fused_model, directory)  # apply_lora from the config, then the weights
    for module in fused_model.modules():
        if isinstance(module, fused_lora.FusedLoRALinear):
            module.backend = args.backend
    return peft_model.to(args.device), fused_model.to(args.device)


def train(model, batches, args) -> dict:
    """AdamW on the trainable parameters; returns losses, tokens/s and peak memory."""
    device = torch.device(args.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses, tokens, elapsed = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    saved = 0
    for step, batch in enumerate(batches):
        batch = batch.to(device)
        torch.manual_seed(args.seed + step)  # dropout seeds, the same for both runs
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if step == 0 and device.type != "cuda":
            box = {}
            saved = saved_tensor_bytes(lambda: box.setdefault("loss", model(input_ids=batch, labels=batch).loss),
                                       exclude=model.parameters())
            loss = box["loss"]
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:  # the first step warms up
            elapsed += time.perf_counter() - start
            tokens += batch.numel()
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else saved
    return {"losses": losses, "tokens_per_s": tokens / elapsed if elapsed else float("nan"), "peak_bytes": peak}


def run(args) -> dict:
    """Train PEFT and fused_lora on the same batches; returns both results."""
    batches = make_batches(offline_text(), args.steps, args.batch_size, args.seq_len, args.seed)
    peft_model, fused_model = build_pair(args)
    return {"peft": train(peft_model, batches, args), "fused_lora": train(fused_model, batches, args)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, choices=[None, "triton", "cpu", "torch"])
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: expected at least 2 (the first step is a warm-up)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    peft_result, fused_result = results["peft"], results["fused_lora"]
    print(f"{'step':>4}  {'PEFT loss':>10}  {'fused loss':>10}  {'|diff|':>9}")
    for step, (a, b) in enumerate(zip(peft_result["losses"], fused_result["losses"])):
        print(f"{step:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>9.2e}")
    memory = "peak memory allocated" if args.device.startswith("cuda") else "saved for backward (1 step)"
    for name, result in results.items():
        print(f"{name:>10}: {result['tokens_per_s']:,.0f} tokens/s, {memory}: {result['peak_bytes'] / 2**20:,.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
