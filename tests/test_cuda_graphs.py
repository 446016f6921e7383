"""The dropout seed as a tensor: each backward uses its own forward's mask; on CUDA a captured
graph (torch.cuda.graph, torch.compile(mode="reduce-overhead")) draws a new mask per replay.

The layers here use identity adapters (K = N = r, lora_A = lora_B = I), so the mask is
visible in the outputs: y - x W^T - b = s * D(x), and dx - dy W = s * D(dy).
"""

import pytest
import torch

import fused_lora
from fused_lora import fused_lora_linear

from conftest import DEVICE_BACKENDS, DEVICE_BACKEND_IDS

SIZE, SCALING, P = 16, 0.5, 0.5


def _identity_layer_tensors(device, rows=24):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, SIZE, generator=gen) + 0.5).to(device)  # no zeros: a zero would hide its mask bit
    weight = (torch.randn(SIZE, SIZE, generator=gen) / 4).to(device)
    bias = torch.randn(SIZE, generator=gen).to(device)
    eye = torch.eye(SIZE, device=device)
    dy = (torch.rand(rows, SIZE, generator=gen) + 0.5).to(device)
    return x, weight, bias, eye.clone(), eye.clone(), dy


def _masks_seen(x, weight, bias, y, dx, dy):
    """(forward mask, backward mask) read off the outputs of an identity-adapter layer."""
    lora_fwd = y - (x @ weight.T + bias)
    lora_bwd = dx - dy @ weight
    return lora_fwd.abs() > 1e-3, lora_bwd.abs() > 1e-3


def _check_masks(seed, x, weight, bias, y, dx, dy):
    fwd_mask, bwd_mask = _masks_seen(x, weight, bias, y, dx, dy)
    assert torch.equal(fwd_mask, bwd_mask), "backward used another mask than its forward"
    if seed is not None:
        expected = fused_lora.dropout_mask(int(seed), *x.shape, P)
        assert torch.equal(fwd_mask.cpu(), expected), "the mask is not dropout_mask(seed) of that call"
    torch.testing.assert_close(y - (x @ weight.T + bias), fwd_mask * x * SCALING / (1 - P))
    return fwd_mask


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=DEVICE_BACKEND_IDS)
def test_seed_tensor_is_saved_and_reused_in_backward(device, backend):
    x, weight, bias, A, B, dy = _identity_layer_tensors(device)
    seed = torch.tensor(2 ** 41 + 9, dtype=torch.int64, device=device)
    x = x.requires_grad_(True)
    y = fused_lora_linear(x, weight, bias, A, B, SCALING, P, seed=seed, backend=backend)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    _check_masks(seed.item(), x.detach(), weight, bias, y.detach(), dx, dy)
    # The same seed as an int: the same call, bit for bit.
    x2 = x.detach().clone().requires_grad_(True)
    y2 = fused_lora_linear(x2, weight, bias, A, B, SCALING, P, seed=int(seed), backend=backend)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=DEVICE_BACKEND_IDS)
def test_seed_tensor_modified_after_forward_is_never_silently_used(device, backend):
    # Backward uses its forward's mask: a seed tensor changed in place after the forward is
    # either caught (where the tensor is saved for backward) or was already read (the cpu
    # backend's C++ node reads it in forward); never a silent other mask.
    x, weight, bias, A, B, dy = _identity_layer_tensors(device)
    x = x.requires_grad_(True)
    seed = torch.tensor(5, dtype=torch.int64, device=device)
    y = fused_lora_linear(x, weight, bias, A, B, SCALING, P, seed=seed, backend=backend)
    (expected,) = torch.autograd.grad(y, (x,), dy)
    seed = torch.tensor(5, dtype=torch.int64, device=device)
    y = fused_lora_linear(x, weight, bias, A, B, SCALING, P, seed=seed, backend=backend)
    seed.add_(1)
    try:
        (dx,) = torch.autograd.grad(y, (x,), dy)
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
    else:
        assert torch.equal(dx, expected), "backward used the changed seed"


def test_seed_argument_is_validated():
    x, weight, bias, A, B, _ = _identity_layer_tensors("cpu")
    for bad, error in ((2.5, TypeError), (torch.tensor(5.7), TypeError), (torch.tensor([1, 2]), TypeError),
                       (-1, ValueError), (torch.tensor(-3), ValueError), (True, TypeError)):
        with pytest.raises(error, match="seed"):
            fused_lora_linear(x, weight, bias, A, B, SCALING, P, seed=bad, backend="torch")
        with pytest.raises(error, match="seed"):
            fused_lora.FusedLoRAFunction.apply(x, weight, bias, A, B, SCALING, P, bad, "torch")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_cuda
@pytest.mark.parametrize("explicit_seed", [True, False])
def test_cuda_graph_replays_draw_new_masks(monkeypatch, explicit_seed):
    device = torch.device("cuda")
    x, weight, bias, A, B, dy = _identity_layer_tensors(device)
    x = x.requires_grad_(True)
    drawn = []
    original = fused_lora.functional.draw_seed

    def recording_draw(device_):
        seed = original(device_)
        drawn.append(seed)
        return seed

    monkeypatch.setattr(fused_lora.functional, "draw_seed", recording_draw)

    def step():
        seed = fused_lora.dropout.draw_seed(device) if explicit_seed else None
        y = fused_lora_linear(x, weight, bias, A, B, SCALING, P, seed=seed, backend="triton")
        (dx,) = torch.autograd.grad(y, (x,), dy)
        return seed, y, dx

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compiles and builds the launch plans outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    drawn.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed, y, dx = step()
    seed = seed if explicit_seed else drawn[-1]
    masks, seeds = [], []
    for _ in range(4):
        graph.replay()
        torch.cuda.synchronize()
        seeds.append(seed.item())
        masks.append(_check_masks(seeds[-1], x.detach(), weight, bias, y.detach(), dx, dy))
    assert len(set(seeds)) == len(seeds), f"replays reused a seed: {seeds}"
    assert all(not torch.equal(masks[0], m) for m in masks[1:])


@needs_cuda
def test_reduce_overhead_compile_draws_new_masks():
    device = torch.device("cuda")
    x, weight, bias, A, B, dy = _identity_layer_tensors(device)
    layer = fused_lora.FusedLoRALinear(SIZE, SIZE, r=SIZE, lora_alpha=SCALING * SIZE, lora_dropout=P, device=device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)

    compiled = torch.compile(layer, mode="reduce-overhead")
    masks = []
    for _ in range(5):
        x_ = x.detach().clone().requires_grad_(True)
        y = compiled(x_)
        y.backward(dy)
        masks.append(_check_masks(None, x, weight, bias, y.detach().clone(), x_.grad.clone(), dy))
    assert all(not torch.equal(masks[-1], m) for m in masks[-3:-1]), "replays reused one mask"
