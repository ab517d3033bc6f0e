"""The paged KV cache's tensors: per-layer K and V pools of fixed-size blocks.

Layout (vLLM's, as kernels/ expects): k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim].
Token t of a sequence lives in block table[t // block_size] at offset t % block_size. Which request
holds which block is workers.runtime.kv_cache_manager's business.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.runtime.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


class KVCache:
    """The cache tensors of every layer, allocated once; on the host as untouched zero pages, so resident
    memory grows with the blocks actually used, not with the budget."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [_zeros(shape, device, dtype) for _ in range(config.n_layers)]
        self.v = [_zeros(shape, device, dtype) for _ in range(config.n_layers)]


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros; on the CPU from calloc (numpy), whose pages stay untouched until written, where torch.zeros
    would write, and so make resident, the whole pool at once. Zeros, not empty: a padded gather reads
    slots no token wrote yet, and garbage there could be NaN, which masking does not cancel (0 * NaN)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize])
    return torch.from_numpy(raw).view(dtype)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of block_size that hold `tokens` positions: ceil(tokens / block_size)."""
    return -(-tokens // block_size)
