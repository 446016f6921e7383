"""Bytes saved for backward by FusedLoRALinear and by PEFT's lora.Linear, same shapes.

    python bench/saved_bytes.py [--tokens 4096] [--in-features 1024] [--out-features 1024] [--r 16] [--p 0.1]

Counts the distinct storages autograd saves during one forward, parameters excluded.
"""

import argparse

import torch
import torch.nn as nn

from fused_lora import FusedLoRALinear
from fused_lora.saved_tensors import saved_tensor_bytes


def peft_layer(base, r, lora_alpha, p):
    import peft
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=p)
    return PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()

    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    ours = FusedLoRALinear(args.in_features, args.out_features, r=args.r, lora_alpha=args.r, lora_dropout=args.p)
    ours.backend = args.backend
    # Frozen base, as get_peft_model leaves it.
    peft_lora = peft_layer(nn.Linear(args.in_features, args.out_features).requires_grad_(False), args.r, args.r,
                           args.p)
    x_bytes = x.numel() * x.element_size()
    print(f"x {tuple(x.shape)} fp32 = {x_bytes} bytes; r={args.r}, p={args.p}")
    for name, layer in (("fused_lora", ours), ("peft", peft_lora)):
        saved = saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())
        print(f"{name:>10}: {saved:>10} bytes saved for backward = {saved / x_bytes:.3f} x bytes(x)")


if __name__ == "__main__":
    main()
