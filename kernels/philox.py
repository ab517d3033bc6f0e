"""Philox-4x32-10 in torch, bit-identical to triton.language.rand, for the CPU path.

The sampler keys its noise on (seed, position, vocabulary index) only, so a request draws the same
token whatever batch slot, batch size or block size it gets:
    row_key = randint(seed, position)          # one uint32 per (request, step)
    u[v]    = rand(row_key, v)                 # uniform in [0, 1) per vocabulary index
All arithmetic is on int64 tensors holding uint32 values.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b as a 64-bit product split into (hi, lo) uint32 halves; b < 2**32 so a*b < 2**64 may
    # overflow int64, hence the 16-bit split of a.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b  # < 2**48
    hi_part = a_hi * b  # < 2**48
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    hi = ((hi_part >> 16) + ((lo_part + ((hi_part & 0xFFFF) << 16)) >> 32)) & _MASK32
    return hi, lo


def philox_randint(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """First uint32 output of Philox for key `seed` (int, < 2**32) and counter (offset, 0, 0, 0).

    seed and offset broadcast; returns an int64 tensor of uint32 values, as tl.randint.
    """
    seed = seed.to(torch.int64)
    c0 = (offset.to(torch.int64) & _MASK32).expand(torch.broadcast_shapes(seed.shape, offset.shape))
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed & _MASK32).expand_as(c0).clone()
    k1 = ((seed >> 32) & _MASK32).expand_as(c0).clone()
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1), as triton.language.random.uint_to_uniform_float."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * 4.6566127342e-10


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """tl.rand(seed, offset) in torch: float32 uniforms in [0, 1)."""
    return uint_to_uniform(philox_randint(seed, offset))
