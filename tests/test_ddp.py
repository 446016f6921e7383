"""DistributedDataParallel with the gloo backend on 2 CPU processes: the same gradients as one process.

With dropout (p > 0) each rank draws its own dropout seeds from its own torch generator
(``seed=None``): ranks seeded differently (``torch.manual_seed(base + rank)``) drop different
elements; ranks seeded alike draw the same seeds, so the same mask positions on their
different rows of data, exactly as ``nn.Dropout`` does. The DDP gradients equal a single
process that replays each rank's half of the batch after that rank's ``manual_seed``.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2


def _model(p=0.0):
    from fused_lora import FusedLoRALinear, apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6))
    apply_lora(model, ["0", "4"], r=3, lora_alpha=6, lora_dropout=p)
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = "torch"
            nn.init.normal_(module.lora_B, std=0.5)
    return model.train()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 12, generator=gen), torch.randn(8, 5, 6, generator=gen)


def _loss(model, x, target):
    return (model(x) - target).pow(2).mean()


def _trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(rank, actual, expected, what):
    from tolerances import assert_close_scaled

    assert sorted(actual) == sorted(expected) and len(actual) == 4, sorted(actual)
    for name in expected:
        # The batch's 40 rows, reduced in two halves and all-reduced; chain 12 -> 16 -> 10 -> 6.
        assert_close_scaled(f"rank {rank}, {what}, {name}", actual[name], expected[name], 40 + 12 + 16 + 10 + 6)


def _recording_seeds(functional):
    """Wrap fused_lora.functional.draw_seed; returns the list the drawn seeds go to."""
    seeds = []
    original = functional.draw_seed

    def draw_seed(device="cpu"):
        seed = original(device)
        seeds.append(int(seed))
        return seed

    functional.draw_seed = draw_seed
    return seeds


def _worker(rank, init_file, tests_dir):
    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, target = _data()
        half = x.shape[0] // WORLD_SIZE
        halves = [slice(k * half, (k + 1) * half) for k in range(WORLD_SIZE)]
        local = halves[rank]

        # p = 0: the whole batch on one process.
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        _loss(ddp, x[local], target[local]).backward()
        reference = _model()
        _loss(reference, x, target).backward()
        _assert_same(rank, _trainable_grads(model), _trainable_grads(reference), "p=0")
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

        # p = 0.1, each rank seeded differently: its own masks.
        import fused_lora.functional as functional

        seeds = _recording_seeds(functional)
        model = _model(p=0.1)
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)
        _loss(ddp, x[local], target[local]).backward()
        assert len(seeds) == 2  # one per LoRA layer
        everyone = [None] * WORLD_SIZE
        dist.all_gather_object(everyone, list(seeds))
        assert everyone[0] != everyone[1], f"ranks seeded differently drew the same seeds {everyone}"

        reference = _model(p=0.1)
        losses = []
        for k in range(WORLD_SIZE):  # replay rank k's half after rank k's manual_seed
            torch.manual_seed(100 + k)
            losses.append(_loss(reference, x[halves[k]], target[halves[k]]))
        (sum(losses) / WORLD_SIZE).backward()
        _assert_same(rank, _trainable_grads(model), _trainable_grads(reference), "p=0.1, per-rank seeds")
        p0 = _model()
        _loss(p0, x, target).backward()
        assert not torch.allclose(p0[0].lora_A.grad, reference[0].lora_A.grad, atol=1e-4)  # dropout mattered

        # Ranks seeded alike draw the same seeds.
        seeds.clear()
        torch.manual_seed(100)
        with torch.no_grad():
            ddp(x[local])
        dist.all_gather_object(everyone, list(seeds))
        assert everyone[0] == everyone[1] and len(everyone[0]) == 2, everyone
    finally:
        dist.destroy_process_group()
    # NOTE: a passing rank leaves without the interpreter's C++ teardown: with torch 2.13 a gloo
    # process aborts there about 1 exit in 8 ("terminate called without an active exception"),
    # with or without fused_lora (a bare DDP step shows it too), which failed the test at random.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gloo_two_processes_match_one_process_with_and_without_dropout(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    mp.spawn(_worker, args=(str(tmp_path / "init"), tests_dir), nprocs=WORLD_SIZE, join=True)
