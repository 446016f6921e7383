"""DistributedDataParallel with the gloo backend on 2 CPU processes: the same gradients as one process."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2


def _model():
    from fused_lora import FusedLoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6))
    from fused_lora import apply_lora
    apply_lora(model, ["0", "4"], r=3, lora_alpha=6)
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = "torch"
            nn.init.normal_(module.lora_B, std=0.5)
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 12, generator=gen), torch.randn(8, 5, 6, generator=gen)


def _loss(model, x, target):
    return (model(x) - target).pow(2).mean()


def _worker(rank, init_file, tests_dir):
    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, target = _data()
        half = x.shape[0] // WORLD_SIZE
        local = slice(rank * half, (rank + 1) * half)
        _loss(ddp, x[local], target[local]).backward()

        reference = _model()
        _loss(reference, x, target).backward()
        expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        actual = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert sorted(actual) == sorted(expected) and len(actual) == 4, sorted(actual)
        from tolerances import assert_close_scaled
        for name in expected:
            # The batch's 40 rows, reduced in two halves and all-reduced; chain 12 -> 16 -> 10 -> 6.
            assert_close_scaled(f"rank {rank}, {name}", actual[name], expected[name], 40 + 12 + 16 + 10 + 6)
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    mp.spawn(_worker, args=(str(tmp_path / "init"), tests_dir), nprocs=WORLD_SIZE, join=True)
