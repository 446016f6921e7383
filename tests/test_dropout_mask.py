"""The dropout mask: Philox known answers, one stream on every backend, statistics."""

import math

import pytest
import torch
import triton
import triton.language as tl

import fused_lora
from fused_lora.ops.backends import backend_ops
from fused_lora.kernels.dropout_mask import _keep_tile
from fused_lora.philox import dropout_threshold, keep_mask_torch, philox4x32, random_uint16

from conftest import DEVICE_BACKENDS, DEVICE_BACKEND_IDS


# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(w.item() for w in words) == expected


SEEDS = [0, 1, 12345, 2 ** 32 + 7, 2 ** 63 - 1]
SHAPES = [(1, 1), (3, 5), (7, 13), (33, 70), (16, 64), (5, 3)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, ids=DEVICE_BACKEND_IDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_every_backend_draws_the_same_mask(device, backend, seed, rows, cols):
    for p in (0.1, 0.5, 0.9):
        expected = keep_mask_torch(seed, rows, cols, p)
        actual = backend_ops(backend).keep_mask(seed, rows, cols, p, device)
        assert actual.dtype == torch.bool and actual.shape == (rows, cols)
        assert torch.equal(actual.cpu(), expected), f"{backend} mask differs for seed={seed} p={p}"


def test_public_dropout_mask_matches_contract():
    mask = fused_lora.dropout_mask(99, 10, 12, 0.25)
    assert torch.equal(mask, keep_mask_torch(99, 10, 12, 0.25))
    assert fused_lora.dropout_mask(99, 4, 6, 0.0).all()
    assert fused_lora.dropout_mask(99, 0, 6, 0.5).shape == (0, 6)


def test_random_bits_follow_the_flattened_index():
    # The (T, K) mask is a function of i * K + k only: reshaping T*K elements
    # into another (T', K') keeps every bit.
    a = keep_mask_torch(5, 6, 20, 0.5).reshape(-1)
    b = keep_mask_torch(5, 8, 15, 0.5).reshape(-1)
    assert torch.equal(a, b)
    # An arbitrary start offset reproduces the tail of a longer stream.
    full = random_uint16(77, 0, 100)
    assert torch.equal(random_uint16(77, 37, 50), full[37:87])


@triton.jit
def _keep_tile_probe_kernel(out_ptr, seed, threshold, row_start, K,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr):
    offs_m = row_start + tl.arange(0, BLOCK_M)
    keep = _keep_tile(seed, threshold, offs_m, 0, K, BLOCK_M, BLOCK_K, K_ALIGNED)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptr + offs, keep.to(tl.uint8))


@pytest.mark.parametrize("K", [16, 15])
def test_triton_mask_uses_64_bit_element_indices(K):
    # Rows near 2**36 put element indices near 2**40, past any 32-bit counter.
    device = next(d for d, b in DEVICE_BACKENDS if b == "triton")
    row_start, block_m, block_k, seed, p = 2 ** 36 + 3, 8, 16, 2 ** 40 + 5, 0.5
    out = torch.empty((block_m, block_k), dtype=torch.uint8, device=device)
    _keep_tile_probe_kernel[(1,)](out, seed, dropout_threshold(p), row_start, K,
                          BLOCK_M=block_m, BLOCK_K=block_k, K_ALIGNED=K % 8 == 0)
    expected = torch.stack([random_uint16(seed, (row_start + i) * K, block_k) for i in range(block_m)])
    expected = expected >= dropout_threshold(p)
    # Columns past K are outside the matrix; compare the real ones.
    assert torch.equal(out.cpu().bool()[:, :min(K, block_k)], expected[:, :min(K, block_k)])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_four_sigma(p):
    n = 1_000_000
    kept = keep_mask_torch(2024, 1000, n // 1000, p).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 4 * sigma
    assert abs((1 - dropout_threshold(p) / 65536) - (1 - p)) < 1e-4


def test_neighbouring_elements_are_uncorrelated():
    mask = keep_mask_torch(31337, 1000, 1000, 0.5).float()
    n = mask.numel()
    for a, b, what in ((mask[:, :-1], mask[:, 1:], "row neighbours"),
                       (mask[:-1, :], mask[1:, :], "column neighbours"),
                       (mask.reshape(-1)[:-8], mask.reshape(-1)[8:], "same lane, next Philox call")):
        a, b = a.reshape(-1), b.reshape(-1)
        corr = torch.corrcoef(torch.stack((a, b)))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(n), f"{what}: correlation {corr}"


def test_seeds_give_different_masks_and_same_seed_the_same():
    a = keep_mask_torch(1, 64, 64, 0.5)
    assert torch.equal(a, keep_mask_torch(1, 64, 64, 0.5))
    assert not torch.equal(a, keep_mask_torch(2, 64, 64, 0.5))
    # Seeds that differ only in their high 32 bits differ too.
    assert not torch.equal(a, keep_mask_torch(1 + 2 ** 32, 64, 64, 0.5))
