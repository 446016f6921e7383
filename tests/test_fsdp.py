"""FSDP2 (torch.distributed.fsdp.fully_shard) with gloo on 2 CPU processes, on a model with
FusedLoRALinear layers: frozen base and trainable adapters sharded in the same FSDP group
(mixed requires_grad), 3 AdamW steps. Losses, gradients and parameters equal one process
training on the whole batch.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2
STEPS = 3
# tolerances.py's n: the 40 rows of a batch (reduced in two halves, then all-reduced) and the
# chain 12 -> 16 -> 10 -> 6 of the three layers.
N = 40 + 12 + 16 + 10 + 6


def _model():
    from fused_lora import FusedLoRALinear, apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6))
    apply_lora(model, ["0", "4"], r=3, lora_alpha=6)
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            nn.init.normal_(module.lora_B, std=0.5)
    return model.train()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, 12, generator=gen), torch.randn(8, 5, 6, generator=gen)) for _ in range(STEPS)]


def _loss(model, x, target):
    return (model(x) - target).pow(2).mean()


def _train(model, batches, rows):
    """Losses (averaged over ranks when sharded) and the last step's gradients, after STEPS AdamW steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses, grads = [], {}
    for x, target in batches:
        optimizer.zero_grad()
        loss = _loss(model, x[rows], target[rows])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        losses.append(loss.detach().clone())
    return losses, grads


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _worker(rank, init_file, tests_dir):
    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from tolerances import assert_close_scaled

        from fused_lora import FusedLoRALinear

        model = _model()
        for module in model.modules():
            if isinstance(module, FusedLoRALinear):
                fully_shard(module)  # weight, bias (frozen) and lora_A, lora_B (trainable): one group
        fully_shard(model)
        layer = model[0]
        assert all(isinstance(p, DTensor) for p in layer.parameters())
        assert [p.requires_grad for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)] == [
            False, False, True, True]
        assert layer.lora_A.to_local().shape[0] < layer.lora_A.shape[0]  # really sharded

        batches = _batches()
        half = batches[0][0].shape[0] // WORLD_SIZE
        losses, grads = _train(model, batches, slice(rank * half, (rank + 1) * half))
        for loss in losses:
            dist.all_reduce(loss)
            loss /= WORLD_SIZE

        reference = _model()
        expected_losses, expected_grads = _train(reference, batches, slice(None))
        for step, (loss, expected) in enumerate(zip(losses, expected_losses)):
            assert_close_scaled(f"rank {rank}, loss of step {step + 1}", loss, expected, N)
        assert sorted(grads) == sorted(expected_grads) and len(grads) == 4
        for name in expected_grads:
            assert_close_scaled(f"rank {rank}, step {STEPS} grad {name}", _full(grads[name]), expected_grads[name], N)
        for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
            assert_close_scaled(f"rank {rank}, {name} after {STEPS} steps", _full(param).detach(), expected.detach(), N)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        initial = _model()
        assert not torch.allclose(_full(model[4].lora_B).detach(), initial[4].lora_B, atol=1e-3)  # it trained
    finally:
        dist.destroy_process_group()
    # NOTE: a passing rank leaves without the interpreter's C++ teardown: with torch 2.13 a gloo
    # process aborts there about 1 exit in 8 ("terminate called without an active exception"),
    # with or without fused_lora (a bare DDP step shows it too), which failed the test at random.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_fsdp2_gloo_two_processes_match_one_process():
    import tempfile

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(os.path.join(directory, "init"), tests_dir), nprocs=WORLD_SIZE, join=True)
