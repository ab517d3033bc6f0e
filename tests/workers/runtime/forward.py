"""Direct forward passes for tests: every position's logits of packed prompts."""

from __future__ import annotations

import torch

from workers.runtime.kv_cache import KVCache, block_table_tensor
from workers.runtime.loader import LoadedModel
from workers.runtime.model import ForwardBatch


def packed_logits(lm: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len, V] of every position of each prompt, all prompts prefilled together (varlen)."""
    config = lm.config
    device = lm.model.tok_embeddings.weight.device
    blocks = sum(-(-len(p) // 16) for p in prompts)
    cache = KVCache(config, num_blocks=blocks, block_size=16, device=device, dtype=lm.model.tok_embeddings.weight.dtype)
    tables, cu = [], [0]
    for p in prompts:
        tables.append(cache.allocator.allocate(cache.blocks_for(len(p))))
        cu.append(cu[-1] + len(p))
    batch = ForwardBatch(
        tokens=torch.tensor([t for p in prompts for t in p], device=device),
        positions=torch.cat([torch.arange(len(p)) for p in prompts]).to(device),
        block_tables=block_table_tensor(tables, device), is_prefill=True,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
    )
    logits = lm.model(batch, cache)
    return [logits[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]
