"""Paged KV cache: per-layer block pools, a free-list block allocator, and block tables.

Layout (vLLM's, as kernels/ expects): k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim].
Token t of a sequence lives in block table[t // block_size] at offset t % block_size.
"""

from __future__ import annotations

import torch

from workers.runtime.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockAllocator:
    """Hands out block ids from a free list; blocks are returned whole when a sequence retires."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """The cache tensors of every layer plus their allocator."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.block_size = block_size
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return blocks_for(tokens, self.block_size)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of block_size that hold `tokens` positions: ceil(tokens / block_size)."""
    return -(-tokens // block_size)


def block_table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, max_blocks] int32, rows padded with 0 (never read past a sequence's length)."""
    width = max(len(t) for t in tables)
    rows = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.int32, device=device)
