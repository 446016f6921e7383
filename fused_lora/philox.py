"""Counter-based dropout mask in pure PyTorch: the contract every backend follows.

The mask of a call is a pure function of ``(seed, e)`` where ``e = i * K + k`` is
the element's index in the flattened, contiguous ``(T, K)`` input:

* group ``g = e >> 3`` and lane ``j = e & 7``: one Philox call serves 8 elements;
* Philox4x32-10 with counter ``(g mod 2**32, g >> 32, 0, 0)`` and key
  ``(seed mod 2**32, seed >> 32)`` gives four 32-bit words ``o0..o3``
  (the same function as Triton's ``tl.philox``);
* element ``j`` takes the 16-bit value ``u = (o[j >> 1] >> (16 * (j & 1))) & 0xFFFF``;
* it is kept when ``u >= dropout_threshold(p)``, i.e. with probability
  ``1 - round(p * 65536) / 65536``, within 7.7e-6 of ``1 - p``.

This module is the slow but obviously-correct implementation (int64 tensors
standing in for uint32); the Triton kernels and the C++ backend reproduce it
bit for bit.
"""

from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
ELEMENTS_PER_CALL = 8
_MASK32 = 0xFFFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """The 16-bit threshold: an element is kept when its 16 random bits are >= it."""
    return min(int(round(float(dropout_p) * 65536.0)), 65536)


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 values; returns four int64 tensors.

    The products of two uint32 values wrap modulo 2**64 in int64, which keeps
    both halves exact after masking.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        prod_b = c2 * PHILOX_ROUND_B
        prod_a = c0 * PHILOX_ROUND_A
        # NOTE: in-place after the first op of each line: 4 allocations a round instead of 12.
        c0 = (prod_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (prod_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = prod_b.bitwise_and_(_MASK32)
        c3 = prod_a.bitwise_and_(_MASK32)
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def random_uint16(seed: int, start: int, count: int, device="cpu") -> torch.Tensor:
    """The 16-bit random values of flattened elements ``start .. start + count - 1`` (int32)."""
    device = torch.device(device)
    if count == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    first_group = start // ELEMENTS_PER_CALL
    last_group = (start + count - 1) // ELEMENTS_PER_CALL
    groups = torch.arange(first_group, last_group + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(groups)
    words = philox4x32((groups & _MASK32, groups >> 32, zero, zero),
                       (seed & _MASK32, (seed >> 32) & _MASK32))
    # (G, 4) words -> (G, 4, 2) halves -> (G * 8,) in lane order j = 2 * word + half.
    words = torch.stack(words, dim=1)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2).reshape(-1)
    skip = start - first_group * ELEMENTS_PER_CALL
    return halves[skip:skip + count].to(torch.int32)


def keep_mask_torch(seed: int, rows: int, cols: int, dropout_p: float,
                    device="cpu", chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Bool (rows, cols) mask, True = kept; generated in chunks to bound temporaries.

    NOTE: 2**20 elements a chunk keeps the int64 temporaries (1 MiB each) cache-sized;
    with the in-place rounds, a 4096 x 2048 mask took 44 ms against 91 ms before
    (2**22 elements a chunk, 12 allocations a round), on this project's CPU machines.
    """
    total = rows * cols
    threshold = dropout_threshold(dropout_p)
    out = torch.empty(total, dtype=torch.bool, device=device)
    for start in range(0, total, chunk_elements):
        count = min(chunk_elements, total - start)
        out[start:start + count] = random_uint16(seed, start, count, device) >= threshold
    return out.view(rows, cols)
