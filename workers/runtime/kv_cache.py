"""The paged KV cache's tensors: per-layer K and V pools of fixed-size blocks.

Layout (vLLM's, as kernels/ expects): k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim].
Token t of a sequence lives in block table[t // block_size] at offset t % block_size. Which request
holds which block is workers.runtime.kv_cache_manager's business.
"""

from __future__ import annotations

import torch

from workers.runtime.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


class KVCache:
    """The cache tensors of every layer, allocated once (zero pages: memory is touched as blocks fill)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of block_size that hold `tokens` positions: ceil(tokens / block_size)."""
    return -(-tokens // block_size)
