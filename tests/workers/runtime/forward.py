"""Direct forward passes for tests: every position's logits of packed prompts."""

from __future__ import annotations

import torch

from workers.runtime.kv_cache import KVCache, blocks_for
from workers.runtime.loader import LoadedModel
from workers.runtime.model import ForwardBatch


def rows_batch(rows: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
               num_decodes: int = 0) -> ForwardBatch:
    """A ForwardBatch of rows (new token ids, their first position, the sequence's cache blocks); the
    first num_decodes rows must have one new token each. Logits of every token are returned."""
    tokens, positions, slots, cu = [], [], [], [0]
    for i, (new, start, blocks) in enumerate(rows):
        tokens += new
        positions += range(start, start + len(new))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, start + len(new))]
        if i >= num_decodes:
            cu.append(cu[-1] + len(new))
    width = max(len(b) for _, _, b in rows)
    return ForwardBatch(
        tokens=torch.tensor(tokens, device=device), positions=torch.tensor(positions, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([b + [0] * (width - len(b)) for _, _, b in rows], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([start + len(new) for new, start, _ in rows], dtype=torch.int32, device=device),
        num_decodes=num_decodes, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device) if len(cu) > 1 else None,
    )


def packed_logits(lm: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len, V] of every position of each prompt, all prompts prefilled together (varlen)."""
    weight = lm.model.tok_embeddings.weight
    needs = [blocks_for(len(p), 16) for p in prompts]
    cache = KVCache(lm.config, num_blocks=sum(needs), block_size=16, device=weight.device, dtype=weight.dtype)
    firsts = [sum(needs[:i]) for i in range(len(prompts))]
    rows = [(p, 0, list(range(first, first + n))) for p, first, n in zip(prompts, firsts, needs, strict=True)]
    logits = lm.model(rows_batch(rows, 16, weight.device), cache)
    bounds = [0] + [sum(len(p) for p in prompts[: i + 1]) for i in range(len(prompts))]
    return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
